"""B4 / issue 6: how good is the inverse Fisher? FishLeg's Q against empirical-Fisher inverses and the exact one.

On a small MLP classifier (16 → 32 → 6, tanh, 704 prunable weights) trained briefly on a synthetic task, the
true Fisher over the weights, F = E_x[Jᵀ (diag p − ppᵀ) J], is computed exactly from per-example Jacobians
(float64, torch.func), so the exact damped inverse M⁻¹ = (F + γI)⁻¹ is known. Compared with it:

- empirical-Fisher inverses (γI + (1/K) Σ_k g_k g_kᵀ)⁻¹ from K per-example gradients (K = 1 … 10⁴, data labels
  as oBERT uses, or labels sampled from the model, the unbiased Monte-Carlo true Fisher), dense and
  restricted to the layer / within-row block / diagonal structure (blocks of the estimate inverted);
- FishLeg Qs built through the package's provider API (`diagonal`, `block_diagonal`, `kronecker`; `kfac` and
  `identity` starts) after 0 … N aux steps on minibatches, materialised by matvecs with unit vectors;
- structural references: the exact inverse projected onto each structure (its entries kept, the others 0)
  and the aux-loss optimum of each structure ((F + γI) inverted block by block, what FishLeg converges to
  with Gaussian u); for Kronecker, the nearest R ⊗ L to each layer's block of M⁻¹ (Van Loan–Pitsianis).

Metrics: relative Frobenius error of Q and of diag Q, Spearman correlation of OBS saliencies w²/(2 Q_qq)
with the exact ones, and for 10–50 % of the weights pruned by each method's saliency (global) with joint OBS
compensation under its own Q, δ = −Q[:, P] (Q_PP)⁻¹ w_P: the loss increase it predicts, the quadratic model
½ δᵀFδ (also + gᵀδ) and the actual increase of the training loss. Writes JSON and a PNG.

One concern per module: `problem` (the MLP, its data and the exact Fisher), `structures` (block partitions and
the exact references), `metrics` (errors, saliency ranks, OBS pruning outcomes), `empirical` (empirical-Fisher
inverses), `fishleg` (FishLeg Qs through the package), `checks` (our exact quantities against the package's),
`report` (Markdown table and plot), `__main__` (the command line).

    python -m benchmarks.inverse_quality            # ≈ 5 min on 2 CPU cores → results/inverse_quality.json (+ .png)
    python -m benchmarks.inverse_quality --quick    # one damping, ≈ 15 s → results/inverse_quality_quick.json
    python -m benchmarks.inverse_quality --aux_lr 3e-3 --output benchmarks/results/inverse_quality_lr3e-3.json
"""
