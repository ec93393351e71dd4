"""A quick check that every selection rule runs on a CUDA device as on the CPU.

For our ViT and an ATS-patched timm ViT (DeiT-S sizes, peaked attention so images keep
different counts), each rule (paper ATS, temperature, fuse, merge, ToMe, static shapes) is run
on the CPU and on the GPU in float32, and under bfloat16 autocast on the GPU. Printed: how many
images kept the same tokens on both devices, the largest logit difference among those, and
whether bfloat16 gave finite logits. Needs a GPU; no timing (see speed.py --device cuda).

    python benchmarks/gpu_check.py
"""

import copy

import timm
import torch

import ats_vit.timm as ats_timm
from ats_vit import ViT

RULES = {
    "paper": dict(),
    "temperature 2": dict(temperature=2.0),
    "fuse": dict(dropped="fuse"),
    "merge": dict(dropped="merge"),
    "tome": dict(sampler="tome"),
    "paper static": dict(static_shape=True),
    "merge static": dict(dropped="merge", static_shape=True),
}
SCHEDULE = (196,) * 3 + (150, 120, 100, 80, 60, 50, 40, 30, 20)


def peaky(blocks, scale: float = 4.0) -> None:
    with torch.no_grad():
        for block in blocks:
            qkv = block.attn.qkv.weight
            qkv[: qkv.shape[0] // 3] *= scale


def compare(name: str, run, model, x: torch.Tensor) -> None:
    cpu_logits, cpu_ids = run(model.cpu(), x)
    gpu_logits, gpu_ids = run(model.cuda(), x.cuda())
    gpu_logits, gpu_ids = gpu_logits.float().cpu(), gpu_ids.cpu()
    same = [torch.equal(a[a >= 0], b[b >= 0]) for a, b in zip(cpu_ids, gpu_ids, strict=True)]
    diff = max(
        ((cpu_logits[i] - gpu_logits[i]).abs().max().item() for i, s in enumerate(same) if s), default=0
    )
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16, _ = run(model, x.cuda())
    print(
        f"{name:<22} same tokens {sum(same)}/{len(same)}  max |logit diff| {diff:.2e}  "
        f"bf16 finite {bool(torch.isfinite(bf16.float()).all())}"
    )


@torch.inference_mode()
def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name())
    x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    sizes = dict(image_size=224, patch_size=16, num_classes=1000, dim=384, depth=12, heads=6, mlp_dim=1536)
    torch.manual_seed(0)
    ours = ViT(**sizes, max_tokens_per_depth=(196,) * 12).eval()
    peaky(ours.blocks)
    base = timm.create_model("deit_small_patch16_224").eval()
    peaky(base.blocks)
    for name, rule in RULES.items():
        ours.set_sampling(SCHEDULE, **rule)
        compare(f"ours {name}", lambda m, x: m(x, return_sampled_token_ids=True), ours, x)
        static = rule.pop("static_shape", False)
        patched = ats_timm.apply(
            copy.deepcopy(base), range(3, 12), list(SCHEDULE[3:]), static_shape=static, **rule
        )

        def run(m, x):
            return m(x), ats_timm.last_info(m).token_ids

        compare(f"timm {name}", run, patched, x)


if __name__ == "__main__":
    main()
