"""Train a model: `python train.py [group=option ...] [key=value ...]` (see README.md)."""

from posttrain.train import main

if __name__ == "__main__":
    main()
