"""Parity with mmsegmentation 1.2.2's own DNLNet: logits, losses, gradients, BN statistics.

Opt-in (DNLSEG_PARITY=1): it builds a separate venv with mmseg (tests/parity/make_mmseg_venv.sh,
~1 min, PyPI only) and runs tests/parity/mmseg_reference.py there, which fills mmseg's model with
seeded random weights and random BN statistics and records its outputs. Our model loads mmseg's
state_dict unchanged and must reproduce every recorded number in fp32 to a relative error < 1e-4
(max |ours - mmseg| / max |mmseg| per tensor), for align_corners False and True and for both of our
attention implementations, for the table's R-50-D8 and for the small R-18-D8 (BasicBlocks, the heads of
mmseg's r18-d8 configs) that the orchestration tests train. The reference is mmseg's code itself, never
our own output.

Environment: DNLSEG_MMSEG_VENV (venv folder, default <repo>/.venv-mmseg), DNLSEG_PARITY_REPORT (a
JSON file to write the max errors to), DNLSEG_PARITY_REFERENCE (an existing reference .pt to reuse
instead of running mmseg, e.g. while debugging our model).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.parity,
    pytest.mark.skipif(os.environ.get("DNLSEG_PARITY") != "1",
                       reason="parity with mmsegmentation is opt-in: set DNLSEG_PARITY=1 "
                              "(builds .venv-mmseg)"),
]

REPO = Path(__file__).resolve().parents[1]
PARITY_DIR = REPO / "tests" / "parity"
TOLERANCE = 1e-4
ALIGN_CORNERS = (False, True)
ATTENTIONS = ("naive", "fused")
CASES = ("batch2_64x128", "odd_97x131")
NUM_CLASSES = 5
# Parameters whose gradient is zero in exact arithmetic, so what both sides compute is rounding noise
# (~1e-9 against ~1e-3 for the block's weights) and a per-tensor relative error means nothing:
# - theta / phi biases: whitening subtracts the mean over the positions, a bias cancels;
# - conv_mask bias: it feeds a softmax over the positions, which is shift invariant;
# - g bias (train mode): attention rows and the unary mask sum to 1, so it adds the same constant at
#   every position of every image before conv_out, and the train-mode BN after conv_out removes it;
# - conv_mask weight with a batch of 1 (train mode): the unary term is one constant per image, which
#   that BN removes when the batch holds one image.
# These are compared against the largest gradient of the block's weights instead (and the test checks
# that mmseg's values are indeed that small).
DNL = "decode_head.dnl_block"
ZERO_GRADIENT = (f"{DNL}.theta.conv.bias", f"{DNL}.phi.conv.bias", f"{DNL}.conv_mask.bias",
                 f"{DNL}.g.conv.bias")
ZERO_GRADIENT_BATCH1 = (f"{DNL}.conv_mask.weight",)
BLOCK_WEIGHTS = (f"{DNL}.g.conv.weight", f"{DNL}.theta.conv.weight", f"{DNL}.phi.conv.weight",
                 f"{DNL}.conv_out.conv.weight")

MAX_ERRORS: dict[str, float] = {}
TIMINGS: dict[str, float] = {}


def record(quantity: str, err: float) -> None:
    MAX_ERRORS[quantity] = max(err, MAX_ERRORS.get(quantity, 0.0))


def rel_err(ours: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    ours, ref = ours.detach().double(), ref.detach().double()
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} vs mmseg {tuple(ref.shape)}"
    denom = ref.abs().max().item() if scale is None else float(scale)
    return (ours - ref).abs().max().item() / max(denom, 1e-30)


def assert_close_dict(quantity: str, ours: dict, ref: dict, scales: dict | None = None) -> None:
    assert ours.keys() == ref.keys(), f"{quantity}: key sets differ: {sorted(ours.keys() ^ ref.keys())[:5]}"
    errors = {k: rel_err(ours[k], ref[k], (scales or {}).get(k)) for k in ref}
    worst = max(errors, key=errors.get)
    record(quantity, errors[worst])
    bad = sorted((k for k, e in errors.items() if not e < TOLERANCE), key=errors.get, reverse=True)
    assert not bad, (f"{quantity}: {len(bad)}/{len(errors)} tensors over {TOLERANCE}: "
                     + ", ".join(f"{k} {errors[k]:.2e}" for k in bad[:8]))


@pytest.fixture(scope="module", autouse=True)
def report_max_errors(request):
    yield
    if not MAX_ERRORS:
        return
    lines = ["parity with mmseg 1.2.2, max relative error per quantity (tolerance 1e-4):"]
    lines += [f"  {k:40s} {v:.3e}" for k, v in sorted(MAX_ERRORS.items())]
    lines += [f"  time {k:35s} {v:.1f} s" for k, v in TIMINGS.items()]
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # shown without -s too
            reporter.write_line("")
            for line in lines:
                reporter.write_line(line)
    report = os.environ.get("DNLSEG_PARITY_REPORT")
    if report:
        Path(report).write_text(json.dumps({"max_rel_error": MAX_ERRORS, "seconds": TIMINGS}, indent=2))


def _mmseg_python() -> Path:
    """The mmseg venv's python, building the venv first if needed (the script is idempotent)."""
    venv = Path(os.environ.get("DNLSEG_MMSEG_VENV", REPO / ".venv-mmseg"))
    start = time.perf_counter()
    try:
        proc = subprocess.run(["bash", str(PARITY_DIR / "make_mmseg_venv.sh"), str(venv)],
                              capture_output=True, text=True, timeout=1200)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot build the mmseg venv with tests/parity/make_mmseg_venv.sh: {e}")
    TIMINGS.setdefault("mmseg venv (build or reuse)", time.perf_counter() - start)   # the first: a build
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        pytest.skip(f"cannot build the mmseg venv with tests/parity/make_mmseg_venv.sh: {tail}")
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=(50, 18), ids=lambda d: f"R-{d}")
def reference(request, tmp_path_factory):
    """mmseg's outputs (see tests/parity/mmseg_reference.py for the layout), for each depth."""
    depth = request.param
    reuse = os.environ.get("DNLSEG_PARITY_REFERENCE")
    if reuse and depth != 50:
        pytest.skip("DNLSEG_PARITY_REFERENCE holds one (R-50) reference")
    if reuse:
        if not Path(reuse).is_file():
            raise FileNotFoundError(f"DNLSEG_PARITY_REFERENCE: no such file {reuse}")
        return torch.load(reuse, map_location="cpu", weights_only=True)
    python = _mmseg_python()
    out = tmp_path_factory.mktemp("mmseg_reference") / "reference.pt"
    start = time.perf_counter()
    proc = subprocess.run([str(python), str(PARITY_DIR / "mmseg_reference.py"), "--out", str(out),
                           "--depth", str(depth), "--num-classes", str(NUM_CLASSES), "--seed", "0"],
                          capture_output=True, text=True, timeout=1800, cwd=out.parent)
    assert proc.returncode == 0, f"mmseg_reference.py failed:\n{proc.stderr[-3000:]}"
    TIMINGS[f"mmseg reference run R-{depth}"] = time.perf_counter() - start
    payload = torch.load(out, map_location="cpu", weights_only=True)
    assert payload["meta"]["depth"] == depth
    out.unlink()  # ~1 GB of gradients: do not leave it in pytest's kept temp dirs
    return payload


def build_ours(reference, align_corners: bool, attention: str):
    try:
        from components.learning.models import build_dnlnet
    except ImportError as e:
        pytest.skip(f"components.learning.models.build_dnlnet not importable yet: {e}")
    model = build_dnlnet(depth=reference["meta"]["depth"], num_classes=reference["meta"]["num_classes"],
                         align_corners=align_corners, attention=attention, avg_non_ignore=False,
                         aux_weight=reference["meta"]["aux_loss_weight"], dropout=0.0)
    model.load_state_dict(reference["state_dict"], strict=True)
    return model


def test_state_dict_names_and_shapes_match_mmseg(reference):
    ours = build_ours(reference, False, "fused").state_dict()
    ref = reference["state_dict"]
    # Key order differs harmlessly (mmseg registers conv_seg before the convs); names must not.
    assert sorted(ours.keys() ^ ref.keys()) == [], "state_dict names differ from mmseg's"
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in ref.items()}


def test_reference_weights_are_not_the_initial_ones(reference):
    """Guards the test's own premise: conv_out's BN is live and BN statistics are not the defaults."""
    sd = reference["state_dict"]
    bn = "decode_head.dnl_block.conv_out.bn"
    assert sd[f"{bn}.weight"].abs().min() > 0.1 and sd[f"{bn}.bias"].abs().max() > 0.1
    assert sd["backbone.stem.1.running_mean"].abs().max() > 0.05
    assert not torch.allclose(sd["backbone.stem.1.running_var"], torch.ones(32))
    assert all((v > 0).all() for k, v in sd.items() if k.endswith("running_var"))


@pytest.mark.parametrize("align_corners", ALIGN_CORNERS, ids=lambda a: f"align_corners={a}")
def test_load_mmseg_checkpoint_file(reference, tmp_path, align_corners):
    from components.learning.models.checkpoint import load_mmseg_checkpoint

    path = tmp_path / "mmseg_dnlnet.pth"
    torch.save({"state_dict": reference["state_dict"], "meta": {}}, path)
    model = build_ours(reference, align_corners, "fused")
    with torch.no_grad():  # make sure the load really overwrites
        for p in model.parameters():
            p.zero_()
    load_mmseg_checkpoint(model, path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference["state_dict"][k]), k
    case = reference["cases"]["batch2_64x128"]
    model.eval()
    with torch.no_grad():
        logits = model.encode_decode(case["img"])
    ref = reference["results"][f"align_corners={align_corners}"]["batch2_64x128"]["encode_decode"]
    err = rel_err(logits, ref)
    record("logits via load_mmseg_checkpoint", err)
    assert err < TOLERANCE


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("align_corners", ALIGN_CORNERS, ids=lambda a: f"align_corners={a}")
def test_eval_logits_match_mmseg(reference, align_corners, attention, case):
    from components.learning.models.inference import predict_logits

    ref = reference["results"][f"align_corners={align_corners}"][case]
    img = reference["cases"][case]["img"]
    meta = reference["meta"]
    model = build_ours(reference, align_corners, attention).eval()
    with torch.no_grad():
        logits = model.encode_decode(img)
    whole = predict_logits(model, img, mode="whole")
    slide = predict_logits(model, img, mode="slide", crop_size=tuple(meta["slide_crop_size"]),
                           stride=tuple(meta["slide_stride"]))
    errors = {"encode_decode": rel_err(logits, ref["encode_decode"]),
              "whole inference": rel_err(whole, ref["whole"]),
              "slide inference": rel_err(slide, ref["slide"])}
    for name, err in errors.items():
        record(f"{name} ({attention})", err)
    assert all(e < TOLERANCE for e in errors.values()), errors


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("align_corners", ALIGN_CORNERS, ids=lambda a: f"align_corners={a}")
def test_train_losses_gradients_and_bn_stats_match_mmseg(reference, align_corners, attention, case):
    ref = reference["results"][f"align_corners={align_corners}"][case]
    data = reference["cases"][case]
    model = build_ours(reference, align_corners, attention).train()
    model.zero_grad(set_to_none=True)
    out = model.forward_train(data["img"], data["label"])
    out["loss"].backward()

    weight = reference["meta"]["aux_loss_weight"]
    # mmseg's aux.loss_ce already carries the 0.4; our aux_loss is the plain cross entropy.
    losses = {"decode": rel_err(out["decode_loss"], ref["losses"]["decode.loss_ce"]),
              "aux (x0.4)": rel_err(weight * out["aux_loss"], ref["losses"]["aux.loss_ce"]),
              "total": rel_err(out["loss"], ref["losses"]["loss"])}
    for name, err in losses.items():
        record(f"loss {name} ({attention})", err)
    assert all(e < TOLERANCE for e in losses.values()), losses

    grads = {n: p.grad for n, p in model.named_parameters()}
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"no gradient for {missing[:5]}"
    zero = ZERO_GRADIENT + (ZERO_GRADIENT_BATCH1 if data["img"].shape[0] == 1 else ())
    block_scale = max(ref["grads"][n].abs().max() for n in BLOCK_WEIGHTS)
    for n in zero:  # the premise of the special case, checked on mmseg's side
        assert ref["grads"][n].abs().max() < 1e-5 * block_scale, f"mmseg's {n} gradient is not ~0"
    assert_close_dict(f"gradients ({attention})", grads, ref["grads"], {n: block_scale for n in zero})

    buffers = dict(model.named_buffers())
    tracked = {k: v for k, v in buffers.items() if k.endswith("num_batches_tracked")}
    for k, v in tracked.items():
        assert torch.equal(v, ref["buffers_after_train"][k]), k
    stats = {k: v for k, v in buffers.items() if k not in tracked}
    assert_close_dict(f"BN running stats after train ({attention})", stats,
                      {k: v for k, v in ref["buffers_after_train"].items() if k in stats})
