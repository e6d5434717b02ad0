"""FLOP accounting against a hand count, loops included in forward and backward."""

from loopnn import ModelConfig
from loopnn.flops import forward_flops_per_token, training_flops_per_token


def test_hand_count_small_looped_config():
    # vocab 100 -> padded 128; C = 8; T = 16; 3 blocks, loop region [1, 3) run 4 times -> 1 + 2*4 = 9 applications
    cfg = ModelConfig(vocab_size=100, block_size=16, n_layer=3, n_head=2, n_embd=8, loop_start=1, n_loops=4)
    per_block = 2 * (3 * 64 + 64 + 4 * 64 + 4 * 64) + 2 * 2 * 8 * 16  # weights (12 C^2) + attention (4 C T)
    head = 2 * 8 * 128
    assert per_block == 1536 + 512
    assert forward_flops_per_token(cfg, 16) == 9 * per_block + head
    f = training_flops_per_token(cfg, 16)
    assert f["forward"] == 9 * per_block + head
    assert f["backward"] == 2 * (9 * per_block + head)  # every loop is backpropagated
    assert f["total"] == 3 * (9 * per_block + head)
    # truncated backprop through the last loop only: the prelude + 1 loop carry gradient
    t = training_flops_per_token(cfg, 16, backprop_loops=1)
    assert t["backward"] == 2 * (3 * per_block + head)
    assert t["forward"] == f["forward"]


def test_loops_cost_like_depth():
    looped = ModelConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=16, n_loops=3)
    deep = ModelConfig(vocab_size=256, block_size=32, n_layer=6, n_head=2, n_embd=16)
    assert training_flops_per_token(looped, 32) == training_flops_per_token(deep, 32)
