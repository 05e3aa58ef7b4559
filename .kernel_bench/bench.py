import os
os.environ["TRITON_INTERPRET"] = "0"
import time
import torch, triton
from torch._library.triton import set_wrap_triton_enabled
from triton.testing import do_bench_cudagraph
from ccgqa_compile.kernels import rms_norm, swiglu

print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
dev = "cuda"
orig_rms_tile = rms_norm._tile_settings


def gpu(fn, nbytes):
    fn()
    ts = sorted(do_bench_cudagraph(fn, rep=30) for _ in range(3))
    return f"{ts[1]*1e3:.0f}us {nbytes / ts[1] / 1e9:.2f}TB/s"


def cpu_overhead(fn, n=200):
    fn(); torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return f"{(t1 - t) / n * 1e6:.0f}us/call"


def rms_inputs(M, N, dtype=torch.bfloat16):
    x = torch.randn(M, N, device=dev, dtype=dtype)
    w = torch.randn(N, device=dev, dtype=dtype)
    dy = torch.randn_like(x)
    _, r = rms_norm.rms_norm_fwd(x, w, 1e-6, 1.0, dtype)
    return x, w, dy, r


def rms(M, N, dtype=torch.bfloat16, sweep=False):
    x, w, dy, r = rms_inputs(M, N, dtype)
    e = x.element_size()
    fwd = lambda: rms_norm.rms_norm_fwd(x, w, 1e-6, 1.0, dtype)
    bwd = lambda: rms_norm.rms_norm_bwd(dy, x, w, r, 1.0)
    print(f"rms {M}x{N} {dtype} tile={rms_norm._tile_settings(N)} fwd {gpu(fwd, 2*M*N*e)} bwd {gpu(bwd, 3*M*N*e)} "
          f"| eager-overhead fwd {cpu_overhead(fwd)} bwd {cpu_overhead(bwd)}")
    ref = lambda: rms_norm.rms_norm_reference(x, w, 1e-6, 1.0, dtype)
    print(f"   torch eager reference fwd {gpu(ref, 2*M*N*e)}")
    if not sweep:
        return
    bn = triton.next_power_of_2(N)
    for bm in (1, 2, 4):
        for nw in (4, 8, 16, 32):
            if bm * bn < nw * 32 * 2 or bm * bn // (nw * 32) > 64:
                continue
            rms_norm._tile_settings = lambda n, bm=bm, nw=nw: (bm, bn, nw)
            line = f"   bm={bm} nw={nw}: fwd {gpu(fwd, 2*M*N*e)} bwd"
            for per_sm in (1, 2, 4):
                rms_norm._BWD_PROGRAMS_PER_SM = per_sm
                line += f" sm*{per_sm} {gpu(bwd, 3*M*N*e)}"
            rms_norm._BWD_PROGRAMS_PER_SM = 2
            print(line)
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
    fwd = lambda: swiglu.swiglu_fwd(g, u)
    bwd = lambda: swiglu.swiglu_bwd(do, g, u, dg, du)
    return fwd, bwd, 3 * M * N * e, 5 * M * N * e


def sw_all():
    for M, N, halves in [(16384, 11008, False), (16384, 11008, True), (16384, 4096, True), (16384, 1000, False), (4096, 128, False)]:
        fwd, bwd, fb, bb = sw(M, N, halves)
        print(f"swiglu {M}x{N} halves={halves}: fwd {gpu(fwd, fb)} bwd {gpu(bwd, bb)} | eager-overhead fwd {cpu_overhead(fwd)} bwd {cpu_overhead(bwd)}")
    orig = swiglu._TILE_ELEMENTS, swiglu._MAX_BLOCK_N, swiglu._NUM_WARPS
    for tile, maxbn, nw in [(4096, 1024, 4), (8192, 1024, 8), (8192, 2048, 8), (16384, 2048, 16), (2048, 2048, 8)]:
        swiglu._TILE_ELEMENTS, swiglu._MAX_BLOCK_N, swiglu._NUM_WARPS = tile, maxbn, nw
        line = f"   sw tile={tile} maxbn={maxbn} nw={nw}:"
        for M, N, halves in [(16384, 11008, True), (16384, 4096, False), (16384, 1000, False)]:
            fwd, bwd, fb, bb = sw(M, N, halves)
            line += f" | {N} fwd {gpu(fwd, fb)} bwd {gpu(bwd, bb)}"
        print(line)
    swiglu._TILE_ELEMENTS, swiglu._MAX_BLOCK_N, swiglu._NUM_WARPS = orig


with set_wrap_triton_enabled(False):
    x = torch.randn(1 << 28, device=dev, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    print("copy", gpu(lambda: y.copy_(x), 2 * x.numel() * 2))
    del x, y
    rms(16384, 4096, sweep=True)
    rms(16384, 11008)
    rms(16384, 2048, sweep=True)
    rms(16384, 8192)
    rms(65536, 128)
    rms(16384, 4096, torch.float32)
    sw_all()
# the HOP path (wrap_triton enabled), as called outside triton_op
x, w, dy, r = rms_inputs(16384, 4096)
print("HOP-path eager overhead rms fwd", cpu_overhead(lambda: rms_norm.rms_norm_fwd(x, w, 1e-6, 1.0, x.dtype)))
