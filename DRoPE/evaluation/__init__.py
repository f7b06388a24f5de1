"""Evaluation of reconstructions (paper Tables 1 and 2): PSNR, SSIM, Frechet distance of CNN slice features,
and DTI errors overall, in white matter and per tract. The script is ``DRoPETrain/evaluate.py``.

Modules: ``metrics`` (PSNR, SSIM, Frechet distance), ``features`` (pretrained EfficientNet-Lite0 slice features),
``atlas`` (tract regions by registration to a shipped MNI FA template), ``engine`` (per-subject evaluation),
``report`` (tables, Markdown, figures).
"""
