"""benchmarks/static_loop.py, the static main-loop measure: its SASS reading on a fixed text, and one
real run (compiled for sm_90 in a subprocess without TRITON_INTERPRET: the JIT decorates kernels as
interpreted functions in this one)."""
import json
import os
import subprocess
import sys
from utils import REPO_ROOT  # noqa: E402

ROOT = REPO_ROOT

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   IMAD R2, R3, 0x4, RZ ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0030*/              @!P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0040*/                   LDG.E.U8 R5, desc[UR4][R6.64] ;
        /*0050*/                   LOP3.LUT R5, R5, 0xf, RZ, 0xc0, !PT ;
        /*0060*/              @!PT LDS RZ, [RZ] ;
        /*0070*/                   FMUL R7, R5, R8 ;
        /*0080*/                   F2FP.BF16.F32.PACK_AB R9, R7, R7 ;
        /*0090*/                   HGMMA.64x256x16.F32.BF16 R24, R160, gdesc[UR8], R24, gsb0 ;
        /*00a0*/                   UIADD3 UR4, UR4, 0x1, URZ ;
        /*00b0*/               @P1 BRA `(.L_x_1) ;
        /*00c0*/                   EXIT ;
"""


def _static_loop():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import static_loop
    finally:
        sys.path.pop(0)
    assert os.environ.get("TRITON_INTERPRET") == "1"  # imported, it leaves this session's interpreter on
    return static_loop


def test_the_largest_loop_with_an_hgmma_is_taken_and_classified():
    sl = _static_loop()
    instrs, labels = sl.parse(SASS)
    body = sl.main_loop(instrs, labels)
    assert [i.op.split(".")[0] for i in body] == ["LDG", "LOP3", "LDS", "FMUL", "F2FP", "HGMMA", "UIADD3", "BRA"]
    assert [sl.classify(i) for i in body] == ["mem", "int", "other", "float", "conv", "hgmma", "unif", "other"]
    assert sl.hgmma_cycles("HGMMA.64x256x16.F32.BF16", "bf16") == 128
    assert sl.hgmma_cycles("HGMMA.64x128x16.F32.BF16", "bf16") == 64


def test_a_real_run_reads_the_kernels_main_loops(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    out = tmp_path / "rows.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "static_loop.py"), "--kernels", "lora", "int8",
                    "--json", str(out)], check=True, env=env, capture_output=True, text=True, timeout=600)
    rows = {r["label"]: r for r in json.load(open(out))}
    assert set(rows) == {"base fwd (x W^T, floor)", "base dX (dY W, floor)", "lora fwd (pointer, r=16)",
                         "int8 fwd", "int8 dX"}
    for r in rows.values():
        assert r["counts"]["hgmma"] > 0 and r["mma"] > 0 and r["total"] > r["counts"]["hgmma"]
    # The floor's forward and the LoRA forward share their main loop (the low-rank term is outside it).
    base, lora = rows["base fwd (x W^T, floor)"]["counts"], rows["lora fwd (pointer, r=16)"]["counts"]
    assert (base["hgmma"], base["mem"], base["int"]) == (lora["hgmma"], lora["mem"], lora["int"])
