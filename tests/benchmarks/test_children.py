"""benchmarks/common/children.py: a failed benchmark child's row carries the end of its stderr."""

import sys

from benchmarks.common.children import TAIL_CHARACTERS, run_child


def test_a_child_that_aborts_reports_its_signal_and_the_end_of_its_stderr(tmp_path, capfd):
    script = "import os, sys\nfor i in range(500): print(f'line {i}', file=sys.stderr)\nsys.stderr.flush()\nos.abort()"
    done = run_child([sys.executable, "-c", script], cwd=tmp_path)
    assert not done.ok and done.returncode == -6
    assert done.describe() == "exit status -6 (signal 6; 9: killed, e.g. out of memory)"
    assert done.tail.endswith("line 499\n") and len(done.tail) == TAIL_CHARACTERS
    assert "line 0\n" in capfd.readouterr().err  # everything passed through, not only the tail


def test_a_child_past_its_timeout_is_killed_and_says_so(tmp_path):
    done = run_child(
        [sys.executable, "-c", "import sys, time; print('working', file=sys.stderr); time.sleep(60)"],
        cwd=tmp_path,
        timeout=3,
    )
    assert done.timed_out and not done.ok
    assert done.describe() == "timed out after 3 s (--timeout)"
    assert done.tail == "working\n"


def test_a_child_that_succeeds_is_ok_with_multibyte_output_intact(tmp_path):
    done = run_child([sys.executable, "-c", "import sys; sys.stderr.write('Ā ⊗ G\\n' * 3000)"], cwd=tmp_path)
    assert done.ok and done.returncode == 0
    assert done.tail.endswith("Ā ⊗ G\n") and "\ufffd" not in done.tail
