"""The Triton projection (kernels/splat.py: project_gaussians, project_gaussians_bwd) against the float64 reference.

Called directly, as the other Triton launchers of the family: on CPU tensors
through the interpreter, on CUDA tensors natively.  The scenes are the
backend tests' (tests/splat/test_backends.py, _proj_scene): random Gaussians
and ones placed behind the camera, beyond the far plane, off the image, past
the 1.3x FOV clamp on each side, below and just above 1/255 opacity, a
needle on the compensation floor and a point.  Forward: equal to the
reference within TOL, the radii exactly equal to the reference run in the
same dtype.  Backward: equal to the reference's autograd (_ref_project_bwd),
bitwise the same on a repeat, and blind to the incoming gradients of culled
pairs.  Refusals: the reference entry's ValueErrors, word for word.
"""

import pytest
import torch

from frontiers_fast.ops import splat as ops_splat
from frontiers_fast.reference import splat as ref
from tests.helpers import assert_close, triton_params

pytest.importorskip("triton")
from frontiers_fast.kernels import splat as K  # noqa: E402

from .scenes import cameras, gaussians  # noqa: E402
from .test_backends import PLANES, _bad_project_inputs, _fov_clamped, _proj_scene  # noqa: E402

CASES = [
    p for p in triton_params((torch.float32, torch.float64)) if p.values[1] in (torch.float32, torch.float64)
]
OUTPUTS = ("means2d", "depths", "conics", "compensations")
GRADS = ("means", "quats", "scales", "viewmats", "Ks")


def _scalars(planes, antialiased):
    """eps2d, near_plane, far_plane, radius_clip, antialiased: the op's positional scalars."""
    kw = {"eps2d": 0.3, "near_plane": 0.01, "far_plane": 1e10, "radius_clip": 0.0, **PLANES[planes]}
    return (kw["eps2d"], kw["near_plane"], kw["far_plane"], kw["radius_clip"], antialiased)


def _on(tensors, device, dtype):
    return [t.to(device=device, dtype=dtype) for t in tensors]


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("C,W,H", [(1, 33, 25), (3, 47, 31)])
@pytest.mark.parametrize("antialiased", [False, True])
@pytest.mark.parametrize("planes", list(PLANES))
def test_project_gaussians(C, W, H, antialiased, planes, device, dtype):
    inputs, idx = _proj_scene(C, W, H, dtype, blur=planes == "default")  # float64, rounded to dtype
    scalars = _scalars(planes, antialiased)
    got = K.project_gaussians(*_on(inputs, device, dtype), W, H, *scalars)
    *out, radii = (t.cpu() for t in got)
    want = ops_splat._ref_project(*inputs, W, H, *scalars)
    same = ref.project_gaussians(*(t.to(dtype) for t in inputs), W, H, *scalars)
    assert radii.dtype == torch.int32 and torch.equal(radii, same[0])
    if dtype == torch.float64:
        assert torch.equal(radii, want[4])
    keep = (radii > 0).all(-1)
    # The scene reaches the branches: culled behind the camera and off the image, kept with the Jacobian clamped.
    assert not keep[:, idx["behind"]].any() and not keep[:, idx["off_screen"]].any()
    clamped = _fov_clamped(inputs[0], inputs[4], inputs[5], W, H)
    for side in ("clamp_right", "clamp_left", "clamp_bottom", "clamp_corner"):
        assert keep[0, idx[side]] and clamped[0, idx[side]], side
    assert keep.sum() > 20 * C
    for name, a, b in zip(OUTPUTS, out, want):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert_close(a, b, dtype, msg=name)
        assert (a[~keep] == 0).all(), f"culled {name} are not zero"

    seeds = [torch.randn(b.shape, dtype=torch.float64) for b in want[:4]]
    got = K.project_gaussians_bwd(*_on(inputs, device, dtype), W, H, *scalars, *_on(seeds, device, dtype))
    expect = ops_splat._ref_project_bwd(*inputs, W, H, *scalars, *seeds)
    for name, a, b, x in zip(GRADS, got, expect, inputs[:3] + inputs[4:]):
        assert a.dtype == dtype and a.shape == x.shape, name
        assert_close(a.cpu(), b, dtype, msg=f"grad {name}")


@pytest.mark.parametrize("device,dtype", CASES)
def test_project_gaussians_bwd_is_deterministic_and_skips_culled(device, dtype):
    # 300 Gaussians: three blocks, so each camera's gradient adds several per-block sums.
    W, H = 41, 29
    viewmats, Ks = cameras(3, W, H)
    inputs = _on([*gaussians(300, extent=2.5), viewmats, Ks], device, dtype)
    scalars = (0.3, 0.01, 1e10, 0.0, True)
    radii = K.project_gaussians(*inputs, W, H, *scalars)[4]
    culled = ~(radii > 0).all(-1)
    assert culled.any() and not culled.all()
    C, N = 3, 300
    seeds = [torch.randn(*s, dtype=dtype, device=device) for s in ((C, N, 2), (C, N), (C, N, 3), (C, N))]
    first = K.project_gaussians_bwd(*inputs, W, H, *scalars, *seeds)
    second = K.project_gaussians_bwd(*inputs, W, H, *scalars, *seeds)
    for name, a, b in zip(GRADS, first, second):
        assert torch.equal(a, b), f"grad {name} differs between two runs"
    # The incoming gradients of culled pairs are never read: NaN there changes nothing.
    poisoned = [s.clone() for s in seeds]
    for s in poisoned:
        s[culled] = float("nan")
    third = K.project_gaussians_bwd(*inputs, W, H, *scalars, *poisoned)
    for name, a, b in zip(GRADS, first, third):
        assert torch.equal(a, b), f"grad {name} reads culled pairs"


@pytest.mark.parametrize("device,dtype", CASES)
def test_project_gaussians_no_gaussians(device, dtype):
    viewmats, Ks = cameras(2, 17, 13)
    inputs = _on([*(t[:0] for t in gaussians(4)), viewmats, Ks], device, dtype)
    scalars = (0.3, 0.01, 1e10, 0.0, False)
    out = K.project_gaussians(*inputs, 17, 13, *scalars)
    assert [tuple(t.shape) for t in out] == [(2, 0, 2), (2, 0), (2, 0, 3), (2, 0), (2, 0, 2)]
    seeds = [torch.zeros(t.shape, dtype=dtype, device=device) for t in out[:4]]
    g = K.project_gaussians_bwd(*inputs, 17, 13, *scalars, *seeds)
    assert [tuple(t.shape) for t in g] == [(0, 3), (0, 4), (0, 3), (2, 4, 4), (2, 3, 3)]
    assert (g[3] == 0).all() and (g[4] == 0).all()


@pytest.mark.parametrize("device,dtype", CASES)
# numpy's overflow warnings under the interpreter, on the rows that overflow on purpose
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_project_gaussians_refuses_what_the_reference_refuses(device, dtype):
    # Every row of the backend tests: non-finite, non-positive scales, short quaternions, opacities
    # outside [0, 1], bad focal lengths, two faults at once, and finite inputs that overflow.
    for what, inputs in _bad_project_inputs(dtype):
        for aa in (False, True):
            scalars = (0.3, 0.01, 1e10, 0.0, aa)
            with pytest.raises(ValueError) as want:
                ops_splat._ref_project(*inputs, 16, 12, *scalars)
            with pytest.raises(ValueError) as got:
                K.project_gaussians(*(t.to(device) for t in inputs), 16, 12, *scalars)
            assert str(got.value) == str(want.value), what
    # a near-zero quaternion, named as the reference names it
    means, quats, scales, opacities = gaussians(5)
    quats[3] = 1e-13
    viewmats, Ks = cameras(1, 16, 12)
    with pytest.raises(ValueError, match=r"quats must be non-zero with norm >= 1e-12.*quats\[3\]"):
        K.project_gaussians(*_on([means, quats, scales, opacities, viewmats, Ks], device, dtype), 16, 12,
                            0.3, 0.01, 1e10, 0.0, False)  # fmt: skip
