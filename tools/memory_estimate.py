"""Estimate AlignProp's peak GPU memory on SDXL (bf16, K = 1) by shape accounting: no GPU, no weights.

    python tools/memory_estimate.py            # prints the table the README quotes

SDXL base's UNet and VAE are built from their published configs on the `meta` device, and one
reward-backprop step is traced: the last UNet call on the CFG-doubled batch, then the VAE decode.
Every tensor autograd saves for backward is counted once (by storage; the frozen weights are
counted separately as resident memory). Attention is counted as a memory-efficient kernel keeps it
(q, k, v, output, row log-sum-exp), as PyTorch's SDPA does on a GPU. Peak = resident weights +
what backward must hold at once:
  call    the UNet call is recomputed in backward, after the VAE's backward has freed the decode's
          activations: resident + max(UNet call, VAE decode)
  blocks  both keep only block boundaries; backward recomputes one block at a time:
          resident + UNet boundaries + VAE boundaries + max(largest VAE block, largest UNet block)
  none    resident + UNet call + VAE decode
Gradient buffers, the reward model's activations and allocator slack come on top (a few GiB), so
these are estimates until measured on a GPU.
"""

import itertools

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel

GiB = 2**30
_sdpa = F.scaled_dot_product_attention


class EfficientAttention(torch.autograd.Function):
    """Saves what a flash / memory-efficient attention kernel keeps: q, k, v, out, log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        with torch.no_grad():
            out = _sdpa(q, k, v)
        ctx.save_for_backward(q, k, v, out, torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device))
        return out


F.scaled_dot_product_attention = lambda q, k, v, *args, **kwargs: EfficientAttention.apply(q, k, v)


class SavedBytes:
    """Bytes saved for backward, once per storage, excluding weights, attributed to the running block."""

    def __init__(self, weights, blocks):
        self.weights, self.seen, self.total, self.by_block, self.block = weights, set(), 0, {}, None
        self.handles = [h for name, m in blocks for h in (
            m.register_forward_pre_hook(lambda m, a, name=name: setattr(self, "block", name)),
            m.register_forward_hook(lambda m, a, o: setattr(self, "block", None)),
        )]  # fmt: skip

    def pack(self, t):
        key = t.untyped_storage()._cdata
        if key not in self.seen and key not in self.weights:
            self.seen.add(key)
            self.total += t.untyped_storage().nbytes()
            if self.block is not None:
                self.by_block[self.block] = self.by_block.get(self.block, 0) + t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)
        for h in self.handles:
            h.remove()


def main():
    dtype = torch.bfloat16
    with torch.device("meta"):
        unet = UNet2DConditionModel(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        ).to(dtype)  # fmt: skip
        vae = AutoencoderKL(  # its vae/config.json
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=1024,
        ).to(dtype)  # fmt: skip
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    weights = {p.untyped_storage()._cdata for p in itertools.chain(unet.parameters(), vae.parameters())}
    # resident in bf16: UNet 2.57 B, both text encoders 0.82 B (123 M + 695 M), VAE 84 M, an aesthetic
    # CLIP ViT-L/14 reward 0.43 B; LoRA weights and AdamW state are a few MB
    resident = (
        sum(p.numel() for p in unet.parameters()) + 0.818e9 + sum(p.numel() for p in vae.parameters()) + 0.428e9
    ) * 2
    unet_blocks = (
        [(f"down{i}", b) for i, b in enumerate(unet.down_blocks)]
        + [("mid", unet.mid_block)]
        + [(f"up{i}", b) for i, b in enumerate(unet.up_blocks)]
    )
    vae_blocks = [("mid", vae.decoder.mid_block)] + [(f"up{i}", b) for i, b in enumerate(vae.decoder.up_blocks)]

    def trace(batch, latent, blocks_mode):
        if blocks_mode:
            unet.enable_gradient_checkpointing(), vae.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing(), vae.disable_gradient_checkpointing()
        n = 2 * batch  # the CFG-doubled UNet batch of the step that carries gradient (w_high != 1)
        with torch.device("meta"):
            x = torch.randn(n, 4, latent, latent, dtype=dtype, requires_grad=True)
            cond = dict(encoder_hidden_states=torch.randn(n, 77, 2048, dtype=dtype),
                        added_cond_kwargs={"text_embeds": torch.randn(n, 1280, dtype=dtype), "time_ids": torch.randn(n, 6, dtype=dtype)})  # fmt: skip
            with SavedBytes(weights, unet_blocks) as u:
                eps = unet(x, torch.full((n,), 500), **cond).sample
            with SavedBytes(weights, vae_blocks) as v:
                _ = vae.decode(eps[:batch]).sample
        return u, v

    print("| resolution | batch | UNet call | VAE decode | peak `call` | peak `blocks` | peak `none` |")
    print("|---|---|---|---|---|---|---|")
    for px, batch in [(512, 1), (512, 4), (1024, 1), (1024, 4)]:
        u, v = trace(batch, px // 8, False)
        ub, vb = trace(batch, px // 8, True)
        call = resident + max(u.total, v.total)
        blocks = resident + ub.total + vb.total + max(max(v.by_block.values()), max(u.by_block.values()))
        none = resident + u.total + v.total
        print(
            f"| {px} | {batch} | {u.total / GiB:.1f} | {v.total / GiB:.1f} | {call / GiB:.0f} | {blocks / GiB:.0f} | {none / GiB:.0f} |"
        )
    print(f"(GiB; resident weights {resident / GiB:.1f} GiB; estimates by shape accounting, not measured)")


if __name__ == "__main__":
    main()
