"""Uptraining for relaxed recursive checkpoints.

The checkpoint directory written by `rrt convert` is the contract: `checkpoint` reads and
writes it, `model` is its forward pass in PyTorch (equal to `rrt`'s, see the round-trip test in
`tests/tests/train.rs`), `loss` is the paper's objective, `data` reads `rrt distill-data`'s
corpus and `cli` trains, evaluates and dumps logits.
"""

__version__ = "0.1.0"
