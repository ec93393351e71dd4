"""Check that every selection rule runs on a CUDA device as on the CPU (no timing).

For our ViT and an ATS-patched timm ViT (peaked attention so images keep different counts),
each rule (paper ATS, temperature, fuse, the authors' ATS, ToMe, static shapes) runs on the CPU and on
the GPU in float32, and under bfloat16 autocast on the GPU. A rule passes when at least
``--min-same`` of the images keep the same tokens on both devices (a near-tie in the CDF may
flip one pick), the logits of those images agree to ``--atol``, and bfloat16 gives finite
logits. Prints one line per rule and exits 1 if any rule fails. ``--device cpu`` runs the
same comparison CPU against CPU (a smoke test of the script itself).

    python benchmarks/gpu_check.py                      # DeiT-S sizes, needs a GPU
    python benchmarks/gpu_check.py --small --device cpu # tiny sizes, anywhere
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable

import timm
import torch
from torch import Tensor, nn

import ats_vit.timm as ats_timm
from ats_vit import SamplingOptions, ViT
from ats_vit.testing import sharpen_queries

RULES = {
    "paper": SamplingOptions(),
    "temperature 2": SamplingOptions(temperature=2.0),
    "fuse": SamplingOptions(dropped="fuse"),
    "official": SamplingOptions(sampler="official"),
    "tome": SamplingOptions(sampler="tome"),
    "paper static": SamplingOptions(static_shape=True),
    "fuse static": SamplingOptions(dropped="fuse", static_shape=True),
}
DEIT_S = dict(image_size=224, patch_size=16, num_classes=1000, dim=384, depth=12, heads=6, mlp_dim=1536)
SMALL = dict(image_size=32, patch_size=8, num_classes=10, dim=64, depth=4, heads=2, mlp_dim=128)

Run = Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]]


def compare(name: str, run: Run, model: nn.Module, x: Tensor, device: str, args: argparse.Namespace) -> bool:
    """One line for ``name``; True when the rule passes."""
    cpu_logits, cpu_ids = run(model.cpu(), x)
    other_logits, other_ids = run(model.to(device), x.to(device))
    other_logits, other_ids = other_logits.float().cpu(), other_ids.cpu()
    same = [torch.equal(a[a >= 0], b[b >= 0]) for a, b in zip(cpu_ids, other_ids, strict=True)]
    diff = max(
        ((cpu_logits[i] - other_logits[i]).abs().max().item() for i, s in enumerate(same) if s), default=0
    )
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=device != "cpu"):
        low, _ = run(model, x.to(device))
    finite = bool(torch.isfinite(low.float()).all())
    ok = sum(same) >= args.min_same * len(same) and diff <= args.atol and finite
    print(
        f"{'ok  ' if ok else 'FAIL'} {name:<22} same tokens {sum(same)}/{len(same)}  "
        f"max |logit diff| {diff:.2e}  bf16 finite {finite}"
    )
    return ok


@torch.inference_mode()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="the device to compare with the CPU")
    parser.add_argument("--small", action="store_true", help="tiny sizes instead of DeiT-S")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest logit difference allowed")
    parser.add_argument(
        "--min-same", type=float, default=0.75, help="share of images keeping the same tokens"
    )
    args = parser.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here (use --device cpu for a smoke test)")
    sizes = SMALL if args.small else DEIT_S
    n = (sizes["image_size"] // sizes["patch_size"]) ** 2
    depth = sizes["depth"]
    schedule = tuple(max(1, round(n * 0.85**i)) if i >= 1 else n for i in range(depth))
    x = torch.randn(
        8, 3, sizes["image_size"], sizes["image_size"], generator=torch.Generator().manual_seed(0)
    )
    torch.manual_seed(0)
    ours = sharpen_queries(ViT(**sizes, max_tokens_per_depth=(n,) * depth).eval(), 4.0)
    base = timm.create_model(
        "vit_tiny_patch16_224" if args.small else "deit_small_patch16_224",
        **(dict(img_size=32, patch_size=8, depth=4, num_classes=10) if args.small else {}),
    ).eval()
    sharpen_queries(base, 4.0)
    ok = True
    print(torch.__version__, torch.cuda.get_device_name() if args.device != "cpu" else "cpu")
    for name, rule in RULES.items():
        ours.set_sampling(schedule, rule)
        ok &= compare(
            f"ours {name}", lambda m, x: m(x, return_sampled_token_ids=True), ours, x, args.device, args
        )
        patched = ats_timm.apply(copy.deepcopy(base), caps=tuple(schedule[1:]), start_layer=1, options=rule)

        def run(m: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
            return m(x), ats_timm.last_info(m).token_ids

        ok &= compare(f"timm {name}", run, patched, x, args.device, args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
