"""Image metrics for text-to-image models, read back from image files (PIL and torch only; no torchvision).

    bvqa.py        T2I-CompBench's B-VQA: BLIP VQA's P(yes) for every noun chunk of the prompt, multiplied
    clipscore.py   CLIPScore as torchmetrics defines it; per-frame CLIPScore and CLIP-Temp for clips
    fid.py         FID and Patch-FID on the Inception-v3 pool3 features, pytorch-fid's Frechet distance
    inception.py   the FID Inception-v3 (TF 2015-12-05 graph) in plain torch, and its input resizing
    folder.py      which images to score and their prompts; the per-image cache keyed by file content

`tsm eval` (tsm/bench/eval.py) runs them on a folder or on a trained run's samples (docs/eval.md).
"""
