#!/usr/bin/env python3
"""capture_hf.py - end-to-end check of scripts/moecal-capture and `moecal
calibrate` against Hugging Face transformers on a tiny DeepSeek-V3 model.

  capture_hf.py build MODEL_DIR TEXT_FILE
      a tiny randomly initialised DeepseekV3ForCausalLM (bf16 safetensors, no
      download), a word-level tokenizer beside it, and random calibration text
  capture_hf.py reference MODEL_DIR ACT.h5 REF.npz --seq-len N --batch-size N
                 --max-tokens N [--device DEV] [--capture SCRIPT]
      runs the model over the same tokens as moecal-capture with hooks on the
      MoE blocks and experts; checks that ACT.h5 holds exactly the MoE inputs
      the model saw; records per expert the rows it saw, max |x| (w1/w3 input)
      and max |h| (w2 input), its weight amax, and router near-ties
  capture_hf.py check OUT.h5 REF.npz
      compares moecal's input_amax_calibrated, tokens_per_expert and
      weight_amax with the reference: w1/w3 and weights exact, w2 within 1e-2
  capture_hf.py prefix FULL.h5 SHORT.h5 N
      SHORT.h5 (captured with --max-tokens N, a padded last batch) holds N
      tokens per layer, the first N of FULL.h5

Exit status 0 pass, 1 fail, 77 when torch/transformers are missing.
"""
import argparse
import importlib.machinery
import importlib.util
import os
import sys

try:
    import numpy as np
    import h5py
except ImportError:
    sys.exit(77)

RTOL_W2 = 1e-2


def fail(msg):
    print(f"capture_hf: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def need_torch():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        from transformers import DeepseekV3Config  # noqa: F401
    except ImportError as exc:
        print(f"capture_hf: SKIP: {exc}", file=sys.stderr)
        sys.exit(77)


# ---------------------------------------------------------------- build

CONFIG = dict(
    vocab_size=1000, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
    num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=4,
    n_group=4, topk_group=2, n_shared_experts=1, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=None, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
    max_position_embeddings=1024, routed_scaling_factor=2.5, norm_topk_prob=True,
    tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def words(rng, n):
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    out = set()
    while len(out) < n:
        out.add("".join(rng.choice(letters, size=int(rng.integers(2, 9)))))
    return sorted(out)


def per_expert_checkpoint(model_dir, n_experts, inter):
    """Make sure the checkpoint names every expert's projections separately
    (model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight), as released
    DeepSeek checkpoints do; transformers versions that fuse experts in memory
    may save them fused."""
    import torch
    from safetensors.torch import load_file, save_file
    path = os.path.join(model_dir, "model.safetensors")
    if not os.path.exists(path):
        fail(f"{model_dir}: save_pretrained wrote no single model.safetensors")
    sd = load_file(path)
    fused = [k for k in sd if k.endswith("mlp.experts.gate_up_proj")]
    if not fused:
        return False
    out = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            base = k[: -len("gate_up_proj")]
            for e in range(n_experts):
                out[f"{base}{e}.gate_proj.weight"] = v[e, :inter].contiguous()
                out[f"{base}{e}.up_proj.weight"] = v[e, inter:].contiguous()
        elif k.endswith("mlp.experts.down_proj"):
            base = k[: -len("down_proj")]
            for e in range(n_experts):
                out[f"{base}{e}.down_proj.weight"] = v[e].contiguous()
        else:
            out[k] = v
    for v in out.values():
        assert v.dtype in (torch.bfloat16, torch.float32), v.dtype
    save_file(out, path, metadata={"format": "pt"})
    return True


def cmd_build(args):
    need_torch()
    import torch
    import transformers
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    rng = np.random.default_rng(7)
    torch.manual_seed(7)
    cfg = DeepseekV3Config(**CONFIG)
    # not DeepseekV3Config fields in every version; moecal reads them (the
    # released config.json has them)
    cfg.topk_method = "noaux_tc"
    cfg.scoring_func = "sigmoid"
    if hasattr(cfg, "num_mtp_layers"):
        cfg.num_mtp_layers = 0
    model = DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers[cfg.first_k_dense_replace:]:
            gate = layer.mlp.gate
            # a wider router than the default init, so that routing is skewed,
            # and a positive score-correction bias (exercised, and with s' > 0
            # a masked group can never win)
            gate.weight.normal_(0.0, 0.08)
            gate.e_score_correction_bias.uniform_(0.0, 0.05)
    model = model.to(torch.bfloat16)
    os.makedirs(args.model_dir, exist_ok=True)
    model.save_pretrained(args.model_dir, safe_serialization=True)
    if per_expert_checkpoint(args.model_dir, cfg.n_routed_experts, cfg.moe_intermediate_size):
        print("capture_hf: rewrote fused experts as per-expert tensors")

    n_words = write_tokenizer_and_text(args.model_dir, args.text, CONFIG["vocab_size"], rng)
    print(f"capture_hf: built {args.model_dir} (torch {torch.__version__}, transformers "
          f"{transformers.__version__}) and {args.text} ({n_words} words)")
    return 0


def write_tokenizer_and_text(model_dir, text, vocab_size, rng=None):
    """A word-level tokenizer of vocab_size tokens saved in model_dir, and
    random Zipf-like text over its words in text; returns the word count."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    if rng is None:
        rng = np.random.default_rng(7)
    vocab_words = words(rng, vocab_size - 4)
    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3}
    vocab.update({w: i + 4 for i, w in enumerate(vocab_words)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="[BOS]", eos_token="[EOS]",
                                   unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(model_dir)

    # Random text: Zipf-like word choice, documents separated by blank lines.
    p = 1.0 / np.arange(1, len(vocab_words) + 1)
    p /= p.sum()
    docs = []
    for _ in range(80):
        n = int(rng.integers(60, 240))
        docs.append(" ".join(rng.choice(vocab_words, size=n, p=p)))
    with open(text, "w", encoding="utf-8") as fp:
        fp.write("\n\n".join(docs) + "\n")
    return sum(len(d.split()) for d in docs)


# ---------------------------------------------------------------- reference

def load_capture(path):
    sys.dont_write_bytecode = True   # never write into the source tree
    loader = importlib.machinery.SourceFileLoader("moecal_capture", path)
    spec = importlib.util.spec_from_loader("moecal_capture", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def bf16_bits(t):
    import torch
    return t.to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().view(np.uint16)


def file_bits(ds):
    """bf16 bits of an activation dataset (bf16 -> float32 is exact)."""
    x = ds.astype("float32")[...]
    return (x.view(np.uint32) >> 16).astype(np.uint16)


def router_margins(x, weight, bias, n_group, topk_group, k):
    """Per token: the smaller of the gap between the k-th and (k+1)-th expert
    score and the gap between the last kept and first dropped group score."""
    import torch
    s = torch.sigmoid(torch.nn.functional.linear(x.float(), weight.float()))
    sc = s + bias.float()
    N, E = sc.shape
    g = sc.view(N, n_group, E // n_group).topk(2, dim=-1)[0].sum(-1)
    gs = g.sort(dim=-1, descending=True)[0]
    gmargin = (gs[:, topk_group - 1] - gs[:, topk_group]) if topk_group < n_group \
        else torch.full((N,), float("inf"), device=sc.device)
    keep = torch.zeros_like(g, dtype=torch.bool)
    keep.scatter_(1, g.topk(topk_group, dim=-1)[1], True)
    masked = sc.masked_fill(~keep.repeat_interleave(E // n_group, dim=1), float("-inf"))
    ms = masked.sort(dim=-1, descending=True)[0]
    kmargin = ms[:, k - 1] - ms[:, k]
    return torch.minimum(gmargin, kmargin)


def cmd_reference(args):
    need_torch()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cap = load_capture(args.capture)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    docs = cap.read_documents(argparse.Namespace(text=args.text, jsonl=None, field="text"))
    seqs = cap.token_sequences(tok, docs, args.seq_len, args.max_tokens)
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    kw = {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, **kw).to(dev).eval()
    cfg = model.config
    E, k, I = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    moe_layers = [i for i, layer in enumerate(model.model.layers)
                  if type(layer.mlp).__name__ == "DeepseekV3MoE"]
    Lm = len(moe_layers)
    count = np.zeros((Lm, E), np.int64)
    amax_x = np.zeros((Lm, E), np.float32)
    amax_x_up = np.zeros((Lm, E), np.float32)
    amax_h = np.zeros((Lm, E), np.float32)
    wamax = np.zeros((Lm, E, 3), np.float32)
    near = np.zeros(Lm, np.int64)
    minmargin = np.full(Lm, np.inf)
    inputs = {L: [] for L in moe_layers}
    state = {"mask": None}
    handles = []
    fused = None
    # the dense layers' MLP inputs and every layer's o_proj input amax
    dense_layers = [i for i in range(len(model.model.layers)) if i not in moe_layers]
    dense_in = {L: [] for L in dense_layers}
    o_amax = {}
    for L, layer in enumerate(model.model.layers):
        def o_pre(mod, a, L=L):
            x = a[0].reshape(-1, a[0].shape[-1])[state["mask"].reshape(-1).to(a[0].device)]
            o_amax[L] = max(o_amax.get(L, 0.0), float(x.abs().max().float()))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(o_pre))
        if L in dense_in:
            def d_in(mod, a, L=L):
                x = a[0].reshape(-1, a[0].shape[-1])
                dense_in[L].append(bf16_bits(x[state["mask"].reshape(-1).to(x.device)]))
            handles.append(layer.mlp.register_forward_pre_hook(d_in))

    def upd(arr, li, e, v):
        arr[li, e] = max(arr[li, e], float(v))

    for li, L in enumerate(moe_layers):
        mlp = model.model.layers[L].mlp
        experts = mlp.experts
        fused = not isinstance(experts, torch.nn.ModuleList)

        def moe_pre(mod, a, li=li, L=L, mlp=mlp):
            x = a[0].reshape(-1, a[0].shape[-1])
            keep = state["mask"].reshape(-1).to(x.device)
            xs = x[keep]
            inputs[L].append(bf16_bits(xs))
            m = router_margins(xs, mlp.gate.weight, mlp.gate.e_score_correction_bias,
                               cfg.n_group, cfg.topk_group, k)
            near[li] += int((m < 1e-6).sum())
            minmargin[li] = min(minmargin[li], float(m.min()))
        handles.append(mlp.register_forward_pre_hook(moe_pre))

        if fused:
            def experts_pre(mod, a, li=li):
                x, idx = a[0], a[1]
                keep = state["mask"].reshape(-1).to(x.device)
                for e in range(E):
                    rows = ((idx == e).any(dim=-1) & keep).nonzero().flatten()
                    if rows.numel() == 0:
                        continue
                    xe = x[rows]
                    gate, up = torch.nn.functional.linear(xe, mod.gate_up_proj[e]).chunk(2, dim=-1)
                    h = mod.act_fn(gate) * up
                    count[li, e] += rows.numel()
                    upd(amax_x, li, e, xe.abs().max().float())
                    upd(amax_x_up, li, e, xe.abs().max().float())
                    upd(amax_h, li, e, h.abs().max().float())
            handles.append(experts.register_forward_pre_hook(experts_pre))
            W = experts.gate_up_proj.detach()
            D = experts.down_proj.detach()
            for e in range(E):
                wamax[li, e, 0] = float(W[e, :I].abs().max().float())
                wamax[li, e, 2] = float(W[e, I:].abs().max().float())
                wamax[li, e, 1] = float(D[e].abs().max().float())
        else:
            for e, ex in enumerate(experts):
                def g_pre(mod, a, li=li, e=e):
                    if not bool(state["mask"].all()):
                        fail("per-expert hooks cannot leave padding out: use a --max-tokens "
                             "that fills every batch")
                    count[li, e] += a[0].shape[0]
                    upd(amax_x, li, e, a[0].abs().max().float())

                def u_pre(mod, a, li=li, e=e):
                    upd(amax_x_up, li, e, a[0].abs().max().float())

                def d_pre(mod, a, li=li, e=e):
                    upd(amax_h, li, e, a[0].abs().max().float())
                handles += [ex.gate_proj.register_forward_pre_hook(g_pre),
                            ex.up_proj.register_forward_pre_hook(u_pre),
                            ex.down_proj.register_forward_pre_hook(d_pre)]
                for p, lin in enumerate((ex.gate_proj, ex.down_proj, ex.up_proj)):
                    wamax[li, e, p] = float(lin.weight.detach().abs().max().float())

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    with torch.inference_mode():
        for ids, mask in cap.batches(seqs, args.batch_size, pad):
            ids_t = torch.tensor(ids, device=dev)
            mask_t = torch.tensor(mask, device=dev)
            state["mask"] = mask_t.bool()
            model(input_ids=ids_t, attention_mask=mask_t, use_cache=False)
    for h in handles:
        h.remove()
    if not np.array_equal(amax_x, amax_x_up):
        fail("gate_proj and up_proj saw different inputs")

    # The activation file must hold exactly the MoE inputs of this forward.
    with h5py.File(args.act, "r") as f:
        for L in moe_layers:
            got = file_bits(f[f"layers/{L}/hidden"])
            want = np.concatenate(inputs[L])
            if got.shape != want.shape:
                fail(f"{args.act}: layer {L} holds {got.shape}, the model's MoE block saw "
                     f"{want.shape}")
            diff = int((got != want).sum())
            if diff:
                fail(f"{args.act}: layer {L}: {diff} of {got.size} values differ from the MoE "
                     "input of a second forward pass (non-deterministic kernels?)")
        for L in moe_layers + dense_layers:
            kind = f[f"layers/{L}"].attrs.get("kind", b"")
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            want = "moe" if L in moe_layers else "dense"
            if kind != want:
                fail(f"{args.act}: layer {L} has kind '{kind}', expected '{want}'")
            got = float(f[f"layers/{L}"].attrs["o_proj_input_amax"])
            if got != np.float32(o_amax[L]):
                fail(f"{args.act}: layer {L}: o_proj_input_amax {got}, the hook saw "
                     f"{o_amax[L]}")
        for L in dense_layers:
            got = file_bits(f[f"layers/{L}/hidden"])
            want = np.concatenate(dense_in[L])
            if got.shape != want.shape or int((got != want).sum()):
                fail(f"{args.act}: dense layer {L} differs from its MLP's input")
        extra = set(f["layers"].keys()) - {str(L) for L in moe_layers + dense_layers}
        if extra:
            fail(f"{args.act}: layers {sorted(extra)} are not layers of the model")
    np.savez(args.out, layers=np.array(moe_layers), tokens_per_expert=count, amax_x=amax_x,
             amax_h=amax_h, weight_amax=wamax, near_ties=near, min_margin=minmargin)
    T = sum(len(s) for s in seqs)
    print(f"capture_hf: reference on {dev} ({'fused' if fused else 'per-expert'} experts, "
          f"transformers {transformers.__version__}): {T} tokens, MoE layers {moe_layers}; "
          f"activation file matches the model's MoE inputs, dense MLP inputs "
          f"{dense_layers} and o_proj input amax bit for bit; router near-ties "
          f"(margin < 1e-6) per layer {near.tolist()}, smallest margin "
          f"{', '.join(f'{m:.3g}' for m in minmargin)}")
    return 0


# ---------------------------------------------------------------- check

def cmd_check(args):
    r = np.load(args.ref)
    with h5py.File(args.out, "r") as f:
        layers = [int(x) for x in f["layers"][...]]
        cal = f["input_amax_calibrated"][...]
        tok = f["tokens_per_expert"][...].sum(axis=1)
        wa = f["weight_amax"][...]
        mode = f.attrs["mode"]
    if isinstance(mode, bytes):
        mode = mode.decode()
    if mode != "topk":
        fail(f"{args.out}: mode {mode}, expected topk")
    if layers != [int(x) for x in r["layers"]]:
        fail(f"layers {layers} vs reference {list(r['layers'])}")
    rt, rx, rh = r["tokens_per_expert"], r["amax_x"], r["amax_h"]
    near = r["near_ties"]
    ok = True
    for li, L in enumerate(layers):
        diff = np.abs(tok[li] - rt[li])
        same = diff == 0
        n_bad = int((~same).sum())
        if n_bad:
            # Each token routed differently moves one count up and one down.
            explained = int(diff.sum()) <= 2 * int(near[li])
            print(f"capture_hf: layer {L}: token counts differ for experts "
                  f"{np.flatnonzero(~same).tolist()} (moecal {tok[li][~same].tolist()}, "
                  f"transformers {rt[li][~same].tolist()}); {int(near[li])} router near-ties "
                  f"in this layer{'' if explained else ' do NOT explain it'}")
            ok &= explained
        x_exact = same & np.all(cal[li][:, [0, 2]] == rx[li][:, None], axis=1)
        routed = same & (rt[li] > 0)
        w2_ref = rh[li].astype(np.float64)
        w2_got = cal[li, :, 1].astype(np.float64)
        rel = np.where(routed, np.abs(w2_got - w2_ref) / np.maximum(w2_ref, 1e-30), 0.0)
        never = int((rt[li] == 0).sum())
        bad_x = np.flatnonzero(same & ~x_exact)
        w_exact = bool(np.array_equal(wa[li], r["weight_amax"][li]))
        print(f"capture_hf: layer {L}: {int(routed.sum())} routed experts compared, {never} "
              f"never routed; w1/w3 input amax exact for {int(x_exact.sum())}/{int(same.sum())}; "
              f"w2 input amax max rel diff {rel.max():.2e} (mean {rel[routed].mean():.2e}); "
              f"weight amax {'exact' if w_exact else 'DIFFER'}; tokens {int(tok[li].sum())} "
              f"(= {int(rt[li].sum())})")
        if len(bad_x):
            e = int(bad_x[0])
            print(f"capture_hf: layer {L}: w1/w3 input amax differ for experts {bad_x.tolist()}, "
                  f"e.g. expert {e}: moecal {cal[li, e, [0, 2]].tolist()} vs {float(rx[li, e])}")
            ok = False
        if rel.max() > RTOL_W2:
            e = int(np.argmax(rel))
            print(f"capture_hf: layer {L}: w2 input amax of expert {e}: moecal {w2_got[e]} vs "
                  f"transformers {w2_ref[e]}")
            ok = False
        if not w_exact:
            bad = np.argwhere(wa[li] != r["weight_amax"][li])[0]
            print(f"capture_hf: layer {L}: weight amax differ at expert {bad[0]} projection "
                  f"{bad[1]}: {wa[li][tuple(bad)]} vs {r['weight_amax'][li][tuple(bad)]}")
            ok = False
        never_got = cal[li][rt[li] == 0]
        if np.any(never_got != 0):
            print(f"capture_hf: layer {L}: a never-routed expert has a calibrated input amax")
            ok = False
    if not ok:
        fail(f"{args.out} disagrees with the transformers reference {args.ref}")
    print(f"capture_hf: {args.out} agrees with transformers: w1/w3 exact, w2 within "
          f"{RTOL_W2:g}, token counts equal")
    return 0


def cmd_prefix(args):
    with h5py.File(args.full, "r") as a, h5py.File(args.short, "r") as b:
        if sorted(a["layers"].keys()) != sorted(b["layers"].keys()):
            fail("the two captures hold different layers")
        for L in a["layers"].keys():
            x = a[f"layers/{L}/hidden"]
            y = b[f"layers/{L}/hidden"]
            if y.shape[0] != args.n:
                fail(f"{args.short}: layer {L} holds {y.shape[0]} tokens, expected {args.n} "
                     "(padding not left out?)")
            xa = x.astype("float32")[: args.n]
            ya = y.astype("float32")[...]
            d = np.abs(xa - ya)
            tol = 2e-2 * np.maximum(np.abs(xa), 1e-2)
            if np.any(d > tol):
                i = np.unravel_index(np.argmax(d - tol), d.shape)
                fail(f"layer {L}: token {i[0]} differs between the captures: {xa[i]} vs {ya[i]}")
            print(f"capture_hf: layer {L}: {args.n} tokens with a padded last batch; "
                  f"{int((d == 0).all(axis=1).sum())} rows bit-identical to the unpadded capture, "
                  f"max abs diff {d.max():.3g}")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("model_dir")
    b.add_argument("text")
    r = sub.add_parser("reference")
    r.add_argument("model_dir")
    r.add_argument("act")
    r.add_argument("out")
    r.add_argument("--text", required=True)
    r.add_argument("--seq-len", type=int, required=True)
    r.add_argument("--batch-size", type=int, required=True)
    r.add_argument("--max-tokens", type=int, required=True)
    r.add_argument("--device", default="auto")
    r.add_argument("--capture", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                     "..", "scripts", "moecal-capture"))
    c = sub.add_parser("check")
    c.add_argument("out")
    c.add_argument("ref")
    p = sub.add_parser("prefix")
    p.add_argument("full")
    p.add_argument("short")
    p.add_argument("n", type=int)
    args = ap.parse_args()
    return {"build": cmd_build, "reference": cmd_reference, "check": cmd_check,
            "prefix": cmd_prefix}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
