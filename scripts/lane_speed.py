"""Training speed of the demo's models: one process with every core, against one 1-thread process per core side
by side (what `loopnn demo` does by default, loopnn.lanes). Prints tokens/s per process and together.

    python scripts/lane_speed.py [--mode copy|lm|full] [--steps 200]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

VOCAB = {"copy": 256, "lm": 2048, "full": 2048}  # bytes; BPE 2,048


def measure(mode: str, role: str, threads: int, steps: int) -> float:
    """Tokens/s of `steps` training steps (forward, backward, clip, fused AdamW) after 30 warm-up steps."""
    import torch

    from loopnn import demo
    from loopnn.config import ModelConfig
    from loopnn.model import LoopGPT

    torch.set_num_threads(threads)
    shape, train = demo.MODES[mode].configs()
    model = LoopGPT(ModelConfig(vocab_size=VOCAB[mode], **shape, **demo.models(roles=demo.ROLES)[role]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    g = torch.Generator().manual_seed(0)
    b, t = train["batch_size"], train["seq_len"]
    x, y = (torch.randint(0, VOCAB[mode], (b, t), generator=g) for _ in range(2))

    def step() -> None:
        _, loss = model(x, y, return_logits=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(30):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return b * t * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=sorted(VOCAB), default="copy", help="the demo's setting (default: copy)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--one", nargs=2, metavar=("ROLE", "THREADS"), help=argparse.SUPPRESS)  # a child process
    args = p.parse_args()
    if args.one:
        print(measure(args.mode, args.one[0], int(args.one[1]), args.steps))
        return
    from loopnn import demo
    from loopnn.lanes import cores

    n = cores()
    mode = demo.MODES[args.mode]
    train = mode.configs()[1]
    print(
        f"{n} cores; the models of `loopnn demo` in mode {args.mode} (batch {train['batch_size']} x "
        f"{train['seq_len']} tokens), {args.steps} steps each"
    )
    for role in mode.roles:
        alone = measure(args.mode, role, n, args.steps)
        cmd = [sys.executable, __file__, "--mode", args.mode, "--steps", str(args.steps), "--one", role, "1"]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(n)]
        each = [float(proc.communicate()[0]) for proc in procs]
        print(
            f"{role}: 1 process x {n} threads {alone:,.0f} tokens/s; {n} processes x 1 thread "
            + " + ".join(f"{v:,.0f}" for v in each)
            + f" = {sum(each):,.0f} tokens/s ({sum(each) / alone:.2f}x)"
        )


if __name__ == "__main__":
    main()
