"""Train the embedded default model: a tiny qwen3_moe coder, reproducibly, on CPU.

    python -m workbench.models.train [--minutes 20] [--out workbench/models]

Data: the Python standard library's own source (present on every machine), files sorted by path,
split by file into train and validation (every 20th file is validation). Tokenizer: our own
byte-level BPE (engine.tokenizer.train_byte_level_bpe, 4096 tokens, Qwen's control tokens,
ChatML template). Model: Hugging Face `Qwen3MoeForCausalLM` (torch CPU) with per-head Q/K norm,
rope theta 1,000,000, hidden 256, 4 layers, 8 experts with 2 active, norm_topk_prob, trained with
the router's load-balancing loss. Exported with our own GGUF writer (engine.synth.write_model)
as Q8_0 and as a Q4_K_M-style mix. The final validation loss is recorded next to a unigram
baseline in training.json beside the models.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEED = 1234
VOCAB = 4096
SEQ = 256
CONFIG = dict(hidden=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, n_experts=8, n_experts_used=2,
              moe_ff=256, context_length=2048, rope_theta=1_000_000.0, rms_eps=1e-6)


def stdlib_sources(max_bytes: int) -> tuple[list[str], list[str]]:
    """(train texts, validation texts) from the standard library's .py files, deterministic."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
                   and "idlelib" not in p.parts)
    train, val, total = [], [], 0
    for i, p in enumerate(files):
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        (val if i % 20 == 0 else train).append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return train, val


def encode_all(tok, texts: list[str], eot: int) -> np.ndarray:
    ids: list[int] = []
    for t in texts:
        ids.extend(tok.encode(t))
        ids.append(eot)
    return np.array(ids, dtype=np.int64)


def hf_model(vocab: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    c = CONFIG
    cfg = Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=c["hidden"], intermediate_size=c["moe_ff"], moe_intermediate_size=c["moe_ff"],
        num_hidden_layers=c["n_layers"], num_attention_heads=c["n_heads"], num_key_value_heads=c["n_kv_heads"],
        head_dim=c["head_dim"], max_position_embeddings=c["context_length"], rms_norm_eps=c["rms_eps"],
        num_experts=c["n_experts"], num_experts_per_tok=c["n_experts_used"], norm_topk_prob=True,
        tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=True,
        router_aux_loss_coef=0.01, rope_parameters={"rope_type": "default", "rope_theta": c["rope_theta"]},
    )
    cfg._attn_implementation = "sdpa"
    return Qwen3MoeForCausalLM(cfg)


def gguf_tensors(hf) -> dict[str, np.ndarray]:
    """HF state dict -> GGUF tensor names, numpy (rows, cols) orientation."""
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    F = CONFIG["moe_ff"]
    for i in range(CONFIG["n_layers"]):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[b + "attn_q.weight"] = sd[p + "self_attn.q_proj.weight"]
        out[b + "attn_k.weight"] = sd[p + "self_attn.k_proj.weight"]
        out[b + "attn_v.weight"] = sd[p + "self_attn.v_proj.weight"]
        out[b + "attn_output.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[b + "attn_q_norm.weight"] = sd[p + "self_attn.q_norm.weight"]
        out[b + "attn_k_norm.weight"] = sd[p + "self_attn.k_norm.weight"]
        out[b + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[b + "ffn_gate_inp.weight"] = sd[p + "mlp.gate.weight"]
        gate_up = sd[p + "mlp.experts.gate_up_proj"]  # (E, 2F, H)
        out[b + "ffn_gate_exps.weight"] = np.ascontiguousarray(gate_up[:, :F])
        out[b + "ffn_up_exps.weight"] = np.ascontiguousarray(gate_up[:, F:])
        out[b + "ffn_down_exps.weight"] = sd[p + "mlp.experts.down_proj"]
    return out


def evaluate(hf, data: np.ndarray, batches: int, batch: int, rng) -> float:
    import torch

    hf.eval()
    losses = []
    with torch.no_grad():
        for _ in range(batches):
            x = sample_batch(data, batch, rng)
            losses.append(float(hf(input_ids=x, labels=x).loss))
    hf.train()
    return float(np.mean(losses))


def sample_batch(data: np.ndarray, batch: int, rng):
    import torch

    starts = rng.integers(0, len(data) - SEQ - 1, size=batch)
    return torch.from_numpy(np.stack([data[s : s + SEQ] for s in starts]))


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab: int) -> float:
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    p = counts / counts.sum()
    return float(-np.log(p[val]).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0, help="training time budget")
    ap.add_argument("--max-bytes", type=int, default=12_000_000, help="bytes of stdlib source to read")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args(argv)

    import torch

    from engine.synth import SynthSpec, write_model
    from engine.tokenizer import Tokenizer, train_byte_level_bpe

    torch.manual_seed(SEED)
    random.seed(SEED)
    rng = np.random.default_rng(SEED)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    t0 = time.time()
    train_texts, val_texts = stdlib_sources(args.max_bytes)
    tok_data = train_byte_level_bpe(train_texts, VOCAB, eos="<|im_end|>")
    tok = Tokenizer.from_data(tok_data)
    eot = tok_data.tokens.index("<|endoftext|>")
    train = encode_all(tok, train_texts, eot)
    val = encode_all(tok, val_texts, eot)
    print(f"data: {len(train_texts)} train files ({len(train)} tokens), {len(val_texts)} validation files "
          f"({len(val)} tokens); tokenizer in {time.time() - t0:.0f} s", flush=True)

    hf = hf_model(VOCAB)
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters", flush=True)
    opt = torch.optim.AdamW(hf.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = args.minutes * 60
    start = time.time()
    step = 0
    warmup = 100
    while time.time() - start < budget:
        frac = (time.time() - start) / budget
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        x = sample_batch(train, args.batch, rng)
        out = hf(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"step {step} loss {out.loss.item():.3f} lr {lr:.2e} {time.time() - start:.0f} s", flush=True)
    val_loss = evaluate(hf, val, 40, args.batch, np.random.default_rng(SEED + 1))
    uni = unigram_loss(train, val, VOCAB)
    print(f"validation loss {val_loss:.3f} nats/token; unigram baseline {uni:.3f}", flush=True)

    tensors = gguf_tensors(hf)
    c = CONFIG
    args.out.mkdir(parents=True, exist_ok=True)
    files = {}
    for qtype, name in (("Q8_0", "stdlib-coder-q8_0.gguf"), ("Q4_K_M", "stdlib-coder-q4_k_m.gguf")):
        spec = SynthSpec(n_layers=c["n_layers"], hidden=c["hidden"], n_heads=c["n_heads"], n_kv_heads=c["n_kv_heads"],
                         head_dim=c["head_dim"], n_experts=c["n_experts"], n_experts_used=c["n_experts_used"],
                         moe_ff=c["moe_ff"], vocab_size=VOCAB, context_length=c["context_length"],
                         rope_theta=c["rope_theta"], rms_eps=c["rms_eps"], qtype=qtype, tokenizer=None,
                         name="stdlib-coder")
        path = args.out / name
        write_model(path, spec, tensors=tensors, tokenizer_data=tok_data)
        files[qtype] = {"file": name, "bytes": path.stat().st_size}
    record = {
        "seed": SEED, "steps": step, "minutes": round((time.time() - start) / 60, 1), "batch": args.batch,
        "seq": SEQ, "lr": args.lr, "parameters": n_params, "config": c, "vocab": VOCAB,
        "train_tokens": int(len(train)), "validation_tokens": int(len(val)),
        "validation_loss": round(val_loss, 4), "unigram_baseline_loss": round(uni, 4),
        "python": sys.version.split()[0], "torch": torch.__version__, "files": files,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
