"""Evaluate a checkpoint: `python eval.py ckpt_path=<run>/checkpoints/best.ckpt` (see README.md)."""

from posttrain.evaluate import main

if __name__ == "__main__":
    main()
