import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

torch.set_num_threads(1)

# Reliability markers → (what a test of that kind does, what every passing one did). Counted from the
# tests that ran in this session (passed or failed; skipped ones are not counted), see `ReliabilityCount`.
RELIABILITY_MARKERS = {
    "bad_input": ("bad inputs tried", "rejected"),
    "fault": ("faults injected", "survived"),
    "malicious": ("malicious files tried", "refused"),
}


class ReliabilityCount:
    """Counts passed / failed tests per reliability marker and prints one summary line at the end."""

    def __init__(self) -> None:
        self.outcomes: dict[str, dict[str, bool]] = {marker: {} for marker in RELIABILITY_MARKERS}

    def pytest_runtest_logreport(self, report) -> None:
        if report.skipped or (report.when != "call" and report.passed):
            return  # a test counts once: by its call phase, or by a failing setup / teardown
        for marker, outcomes in self.outcomes.items():
            if marker in report.keywords:
                outcomes[report.nodeid] = outcomes.get(report.nodeid, True) and report.passed

    def summary(self) -> str | None:
        parts = []
        for marker, (tried, verb) in RELIABILITY_MARKERS.items():
            outcomes = self.outcomes[marker]
            if outcomes:
                failed = sum(not ok for ok in outcomes.values())
                parts.append(f"{len(outcomes)} {tried} ({f'{failed} NOT {verb}' if failed else f'all {verb}'})")
        return "fls_hf reliability: " + ", ".join(parts) if parts else None

    def pytest_terminal_summary(self, terminalreporter) -> None:
        line = self.summary()
        if line:
            terminalreporter.write_line(line)


def pytest_configure(config) -> None:
    config.pluginmanager.register(ReliabilityCount(), "fls_hf_reliability")
