import os
os.environ["TRITON_INTERPRET"] = "0"
import torch, triton
from triton.testing import do_bench
from ccgqa_compile.kernels import rms_norm, swiglu

print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
dev = "cuda"
orig_rms_tile = rms_norm._tile_settings


def bench(fn, nbytes):
    ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
    return ms, nbytes / ms / 1e9


def rms(M, N, dtype=torch.bfloat16):
    x = torch.randn(M, N, device=dev, dtype=dtype)
    w = torch.randn(N, device=dev, dtype=dtype)
    dy = torch.randn_like(x)
    e = x.element_size()
    y, r = rms_norm.rms_norm_fwd(x, w, 1e-6, 1.0, dtype)
    ms, tb = bench(lambda: rms_norm.rms_norm_fwd(x, w, 1e-6, 1.0, dtype), 2 * M * N * e)
    print(f"rms fwd {M}x{N} {ms*1e3:.0f}us {tb:.2f}TB/s  tile={rms_norm._tile_settings(N)}")
    for per_sm in (1, 2, 4, 8):
        rms_norm._BWD_PROGRAMS_PER_SM = per_sm
        ms, tb = bench(lambda: rms_norm.rms_norm_bwd(dy, x, w, r, 1.0), 3 * M * N * e)
        print(f"  rms bwd per_sm={per_sm} {ms*1e3:.0f}us {tb:.2f}TB/s")
    rms_norm._BWD_PROGRAMS_PER_SM = 2
    # eager torch for comparison
    ms, tb = bench(lambda: rms_norm.rms_norm_reference(x, w, 1e-6, 1.0, dtype), 2 * M * N * e)
    print(f"  torch eager ref fwd {ms*1e3:.0f}us {tb:.2f}TB/s")


def rms_variants(M, N):
    x = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
    w = torch.randn(N, device=dev, dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    _, r = rms_norm.rms_norm_fwd(x, w, 1e-6, 1.0, x.dtype)
    bn = triton.next_power_of_2(N)
    for bm in (1, 2, 4):
        for nw in (4, 8, 16, 32):
            if bm * bn // (nw * 32) < 1:
                continue
            rms_norm._tile_settings = lambda n, bm=bm, nw=nw: (bm, bn, nw)
            f = bench(lambda: rms_norm.rms_norm_fwd(x, w, 1e-6, 1.0, x.dtype), 2 * M * N * 2)[1]
            b = bench(lambda: rms_norm.rms_norm_bwd(dy, x, w, r, 1.0), 3 * M * N * 2)[1]
            print(f"  rms {M}x{N} bm={bm} nw={nw}: fwd {f:.2f} bwd {b:.2f} TB/s")
    rms_norm._tile_settings = orig_rms_tile


def sw(M, N, halves, dtype=torch.bfloat16):
    if halves:
        h = torch.randn(M, 2 * N, device=dev, dtype=dtype)
        g, u = h.chunk(2, -1)
        dh = torch.empty_like(h)
        dg, du = dh.chunk(2, -1)
    else:
        g = torch.randn(M, N, device=dev, dtype=dtype)
        u = torch.randn(M, N, device=dev, dtype=dtype)
        dg = du = None
    do = torch.randn(M, N, device=dev, dtype=dtype)
    e = g.element_size()
    res = []
    ms, tb = bench(lambda: swiglu.swiglu_fwd(g, u), 3 * M * N * e)
    res.append(tb)
    ms2, tb2 = bench(lambda: swiglu.swiglu_bwd(do, g, u, dg, du), 5 * M * N * e)
    res.append(tb2)
    return ms, ms2, res


def sw_all():
    for halves in (False, True):
        ms, ms2, (f, b) = sw(16384, 11008, halves)
        print(f"swiglu 16384x11008 halves={halves}: fwd {ms*1e3:.0f}us {f:.2f}TB/s bwd {ms2*1e3:.0f}us {b:.2f}TB/s")
    for tile, maxbn, nw in [(2048, 1024, 4), (4096, 1024, 4), (4096, 1024, 8), (8192, 1024, 8), (8192, 2048, 8), (8192, 2048, 16), (16384, 2048, 16), (4096, 512, 8), (2048, 2048, 8)]:
        swiglu._TILE_ELEMENTS, swiglu._MAX_BLOCK_N, swiglu._NUM_WARPS = tile, maxbn, nw
        _, _, (f, b) = sw(16384, 11008, True)
        _, _, (f2, b2) = sw(16384, 4096, False)
        print(f"  sw tile={tile} maxbn={maxbn} nw={nw}: 11008h fwd {f:.2f} bwd {b:.2f} | 4096 fwd {f2:.2f} bwd {b2:.2f} TB/s")


x = torch.randn(1 << 28, device=dev, dtype=torch.bfloat16)
y = torch.empty_like(x)
print("copy", bench(lambda: y.copy_(x), 2 * x.numel() * 2)[1], "TB/s")
del x, y
rms(16384, 4096)
rms(16384, 11008)
rms(16384, 2048)
rms(65536, 128)
rms(16384, 8192, torch.float32)
rms_variants(16384, 4096)
sw_all()
