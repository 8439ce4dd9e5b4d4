"""Bad and edge inputs thrown at every public splat function, one class per row.

Each row names the exception and a fragment of its message: the argument at
fault must be named.  The NaN tests check what the docstrings say: NaN and
inf are refused in every float input, in eager calls and inside compiled
graphs alike, so no NaN ever reaches an output.  (The family has no
``nn`` module.)
"""

import math

import numpy as np
import pytest
import torch

import frontiers_fast as ff
from frontiers_fast.reference import splat as ref

from .scenes import cameras, gaussians, projected

W, H, TS = 16, 12, 8
TW, TH = ref.tile_grid(W, H, TS)
META = torch.device("meta")
NAN, INF = float("nan"), float("inf")


def _scene():
    """Fresh small inputs for every stage (float32, two cameras, ten Gaussians)."""
    viewmats, Ks = cameras(2, W, H, torch.float32)
    means, quats, scales, opacities = gaussians(10, torch.float32, opacity=(0.3, 0.9))
    m2d, conics, opac, offsets, fids, radii, depths = projected(2, 10, W, H, TS, dtype=torch.float32)
    _, ids, _ = ref.isect_tiles(m2d, radii, depths, TS, TW, TH)
    return dict(
        means=means, quats=quats, scales=scales, opacities=opacities, viewmats=viewmats, Ks=Ks,
        colors=torch.rand(10, 3), sh=torch.randn(10, 4, 3), dirs=torch.randn(10, 3), coeffs=torch.randn(10, 4, 3),
        means2d=m2d, conics=conics, opac2d=opac, colors2d=torch.rand(2, 10, 3), offsets=offsets, fids=fids,
        radii=radii, depths=depths, ids=ids, bg=torch.rand(2, 3),
    )  # fmt: skip


def _poke(t, value, idx=1):
    t = t.clone()
    t.view(-1)[idx] = value
    return t


# Each caller takes keyword overrides of its inputs, so a row changes one thing.
def project(**kw):
    s = _scene()
    a = dict(means=s["means"], quats=s["quats"], scales=s["scales"], opacities=s["opacities"],
             viewmats=s["viewmats"], Ks=s["Ks"], width=W, height=H)  # fmt: skip
    return ff.project_gaussians(**{**a, **kw})


def sh(**kw):
    s = _scene()
    a = dict(degree=1, dirs=s["dirs"], coeffs=s["coeffs"])
    return ff.spherical_harmonics(**{**a, **kw})


def isect(**kw):
    s = _scene()
    a = dict(means2d=s["means2d"], radii=s["radii"], depths=s["depths"], tile_size=TS, tile_width=TW,
             tile_height=TH)  # fmt: skip
    return ff.isect_tiles(**{**a, **kw})


def encode(**kw):
    s = _scene()
    a = dict(isect_ids=s["ids"], n_images=2, tile_width=TW, tile_height=TH)
    return ff.isect_offset_encode(**{**a, **kw})


def blend(**kw):
    s = _scene()
    a = dict(means2d=s["means2d"], conics=s["conics"], colors=s["colors2d"], opacities=s["opac2d"], width=W,
             height=H, tile_size=TS, isect_offsets=s["offsets"], flatten_ids=s["fids"], backgrounds=s["bg"])  # fmt: skip
    return ff.rasterize_to_pixels(**{**a, **kw})


def render(**kw):
    s = _scene()
    a = dict(means=s["means"], quats=s["quats"], scales=s["scales"], opacities=s["opacities"], colors=s["colors"],
             viewmats=s["viewmats"], Ks=s["Ks"], width=W, height=H, tile_size=TS)  # fmt: skip
    return ff.rasterization(**{**a, **kw})


def _m(name):
    """The named input of a fresh scene, on the meta device."""
    return _scene()[name].to(META)


def _s(name):
    return _scene()[name]


def _all_meta(*names):
    s = _scene()
    return {n: s[n].to(META) for n in names}


# (id, callable, exception, message fragment)
# fmt: off
CASES = [
    # -- project_gaussians ---------------------------------------------------
    ("proj-means-list", lambda: project(means=_s("means").tolist()), TypeError, "means must be a torch.Tensor"),
    ("proj-means-int", lambda: project(means=_s("means").long()), TypeError, "means must be float32 or float64"),
    ("proj-means-bool", lambda: project(means=_s("means").bool()), TypeError, "means must be float32 or float64"),
    ("proj-means-complex", lambda: project(means=_s("means").to(torch.cfloat)), TypeError, "means must be float32"),
    ("proj-means-half", lambda: project(means=_s("means").half()), TypeError, "means must be float32"),
    ("proj-quats-dtype", lambda: project(quats=_s("quats").double()), TypeError, "quats has dtype torch.float64"),
    ("proj-means-dims", lambda: project(means=_s("means")[None]), ValueError, r"means must have shape \[\*, 3\]"),
    ("proj-scales-size", lambda: project(scales=_s("scales")[:9]), ValueError, r"scales must have shape \[10, 3\]"),
    ("proj-opac-dims", lambda: project(opacities=_s("opacities")[:, None]), ValueError, r"opacities must have shape \[10\]"),
    ("proj-viewmats-dims", lambda: project(viewmats=_s("viewmats")[0]), ValueError, r"viewmats must have shape \[\*, 4, 4\]"),
    ("proj-no-camera", lambda: project(viewmats=_s("viewmats")[:0], Ks=_s("Ks")[:0]), ValueError, "viewmats must hold at least one"),
    ("proj-Ks-size", lambda: project(Ks=_s("Ks")[:1]), ValueError, r"Ks must have shape \[2, 3, 3\]"),
    ("proj-Ks-meta", lambda: project(Ks=_m("Ks")), ValueError, "Ks is on meta but means is on cpu"),
    ("proj-width-float", lambda: project(width=16.0), TypeError, "width must be an int"),
    ("proj-width-bool", lambda: project(width=True), TypeError, "width must be an int"),
    ("proj-height-zero", lambda: project(height=0), ValueError, "height must be >= 1"),
    ("proj-eps-str", lambda: project(eps2d="0.3"), TypeError, "eps2d must be a real number"),
    ("proj-eps-neg", lambda: project(eps2d=-1.0), ValueError, "eps2d must be >= 0"),
    ("proj-near-inf", lambda: project(near_plane=INF), ValueError, "near_plane must be finite"),
    ("proj-near-zero", lambda: project(near_plane=0), ValueError, "near_plane must be > 0"),
    ("proj-far-nan", lambda: project(far_plane=NAN), ValueError, "far_plane must be finite"),
    ("proj-far-minus-inf", lambda: project(far_plane=-INF), ValueError, "far_plane must be finite"),
    ("proj-far-bool", lambda: project(far_plane=True), TypeError, "far_plane must be a real number"),
    ("proj-clip-inf", lambda: project(radius_clip=INF), ValueError, "radius_clip must be finite"),
    ("proj-aa-int", lambda: project(antialiased=1), TypeError, "antialiased must be a bool"),
    ("proj-packed-int", lambda: project(packed=1), TypeError, "packed must be a bool"),
    ("isect-packed-str", lambda: isect(packed="yes"), TypeError, "packed must be a bool"),
    ("isect-packed-2d", lambda: isect(packed=True, n_images=2, image_ids=torch.zeros(10, dtype=torch.int32)), ValueError, r"means2d must have shape \[\*, 2\] \(packed rows\)"),
    ("blend-absgrad-int", lambda: blend(absgrad=1), TypeError, "absgrad must be a bool"),
    ("blend-packed-none", lambda: blend(packed=None), TypeError, "packed must be a bool"),
    ("blend-packed-3d", lambda: blend(packed=True), ValueError, r"means2d must have shape \[\*, 2\] \(packed rows\)"),
    ("render-absgrad-int", lambda: render(absgrad=0), TypeError, "absgrad must be a bool"),
    ("render-packed-float", lambda: render(packed=1.0), TypeError, "packed must be a bool"),
    ("proj-means-nan", lambda: project(means=_poke(_s("means"), NAN)), ValueError, "means must be finite"),
    ("proj-Ks-inf", lambda: project(Ks=_poke(_s("Ks"), INF, 2)), ValueError, "Ks must be finite"),
    ("proj-viewmats-nan", lambda: project(viewmats=_poke(_s("viewmats"), NAN)), ValueError, "viewmats must be finite"),
    ("proj-scales-zero", lambda: project(scales=_poke(_s("scales"), 0.0)), ValueError, "scales must be positive"),
    ("proj-quats-zero", lambda: project(quats=torch.zeros(10, 4)), ValueError, "quats must be non-zero"),
    ("proj-opac-range", lambda: project(opacities=_poke(_s("opacities"), 1.5)), ValueError, r"opacities must lie in \[0, 1\]"),
    ("proj-opac-nan", lambda: project(opacities=_poke(_s("opacities"), NAN)), ValueError, "opacities must be finite"),
    ("proj-focal", lambda: project(Ks=-_s("Ks")), ValueError, "Ks must have positive focal"),
    # Finite inputs whose projection overflows float32: named, not blamed on a later stage.
    ("proj-overflow", lambda: project(scales=_s("scales") * 1e30), ValueError, "means, scales, viewmats, Ks or eps2d are too large"),
    ("proj-backend", lambda: project(backend="fast"), ValueError, "backend must be one of"),
    # -- spherical_harmonics -------------------------------------------------
    ("sh-degree-float", lambda: sh(degree=1.0), TypeError, "degree must be an int"),
    ("sh-degree-bool", lambda: sh(degree=True), TypeError, "degree must be an int"),
    ("sh-degree-range", lambda: sh(degree=4, coeffs=torch.randn(10, 25, 3)), ValueError, r"degree must be in \[0, 3\]"),
    ("sh-degree-neg", lambda: sh(degree=-1), ValueError, r"degree must be in \[0, 3\]"),
    ("sh-dirs-list", lambda: sh(dirs=[[0.0, 0.0, 1.0]] * 10), TypeError, "dirs must be a torch.Tensor"),
    ("sh-dirs-int", lambda: sh(dirs=_s("dirs").long()), TypeError, "dirs must be float32 or float64"),
    ("sh-dirs-complex", lambda: sh(dirs=_s("dirs").to(torch.cdouble)), TypeError, "dirs must be float32"),
    ("sh-coeffs-dtype", lambda: sh(coeffs=_s("coeffs").double()), TypeError, "coeffs has dtype torch.float64 but dirs"),
    ("sh-dirs-0d", lambda: sh(dirs=torch.tensor(1.0)), ValueError, "dirs must have shape"),
    ("sh-dirs-width", lambda: sh(dirs=_s("dirs")[:, :2]), ValueError, r"dirs must have shape \[\*, 3\]"),
    ("sh-coeffs-batch", lambda: sh(coeffs=_s("coeffs")[:9]), ValueError, r"coeffs must have shape \[10, \*, 3\]"),
    ("sh-coeffs-bases", lambda: sh(degree=2), ValueError, "coeffs has 4 bases but degree 2 needs 9"),
    ("sh-masks-float", lambda: sh(masks=torch.ones(10)), TypeError, "masks must be a bool tensor"),
    ("sh-masks-shape", lambda: sh(masks=torch.ones(9, dtype=torch.bool)), ValueError, r"masks must have shape \[10\]"),
    ("sh-masks-meta", lambda: sh(masks=torch.ones(10, dtype=torch.bool, device=META)), ValueError, "masks is on meta"),
    ("sh-coeffs-meta", lambda: sh(coeffs=_m("coeffs")), ValueError, "coeffs is on meta but dirs is on cpu"),
    ("sh-dirs-nan", lambda: sh(dirs=_poke(_s("dirs"), NAN)), ValueError, "dirs must be finite"),
    ("sh-coeffs-inf", lambda: sh(coeffs=_poke(_s("coeffs"), -INF)), ValueError, "coeffs must be finite"),
    # -- isect_tiles ---------------------------------------------------------
    ("isect-means2d-tuple", lambda: isect(means2d=(1.0, 2.0)), TypeError, "means2d must be a torch.Tensor"),
    ("isect-means2d-int", lambda: isect(means2d=_s("means2d").int()), TypeError, "means2d must be float32"),
    ("isect-radii-int64", lambda: isect(radii=_s("radii").long()), TypeError, "radii must be int32"),
    ("isect-radii-bool", lambda: isect(radii=_s("radii").bool()), TypeError, "radii must be int32"),
    ("isect-radii-float", lambda: isect(radii=_s("radii").float()), TypeError, "radii must be int32"),
    ("isect-depths-dtype", lambda: isect(depths=_s("depths").double()), TypeError, "depths has dtype"),
    ("isect-means2d-dims", lambda: isect(means2d=_s("means2d")[0]), ValueError, r"means2d must have shape \[\*, \*, 2\]"),
    ("isect-radii-size", lambda: isect(radii=_s("radii")[:, :5]), ValueError, r"radii must have shape \[2, 10, 2\]"),
    ("isect-depths-size", lambda: isect(depths=_s("depths")[:1]), ValueError, r"depths must have shape \[2, 10\]"),
    ("isect-radii-meta", lambda: isect(radii=_m("radii")), ValueError, "radii is on meta but means2d is on cpu"),
    ("isect-all-meta", lambda: isect(**_all_meta("means2d", "radii", "depths")), ValueError, "means2d is a meta tensor"),
    ("isect-tile-size-zero", lambda: isect(tile_size=0), ValueError, "tile_size must be >= 1"),
    ("isect-tile-width-float", lambda: isect(tile_width=2.0), TypeError, "tile_width must be an int"),
    ("isect-tile-height-zero", lambda: isect(tile_height=0), ValueError, "tile_height must be >= 1"),
    ("isect-too-many-tiles", lambda: isect(tile_width=1 << 16, tile_height=1 << 16), ValueError, "tile_width x tile_height is 4294967296 tiles"),
    ("isect-means2d-nan", lambda: isect(means2d=_poke(_s("means2d"), NAN)), ValueError, "means2d must be finite"),
    ("isect-depths-inf", lambda: isect(depths=_poke(_s("depths"), INF)), ValueError, "depths must be finite"),
    ("isect-depths-negative", lambda: isect(depths=-_s("depths").abs() - 1), ValueError, "depths must be >= 0 where radii > 0"),
    ("isect-conics-alone", lambda: isect(conics=_s("conics")), ValueError, "isect_tiles got conics but not opacities"),
    ("isect-opac-alone", lambda: isect(opacities=_s("opac2d")), ValueError, "isect_tiles got opacities but not conics"),
    ("isect-conics-size", lambda: isect(conics=_s("conics")[..., :2], opacities=_s("opac2d")), ValueError, r"conics must have shape \[2, 10, 3\]"),
    ("isect-opac-dtype", lambda: isect(conics=_s("conics"), opacities=_s("opac2d").double()), TypeError, "opacities has dtype torch.float64 but means2d"),
    ("isect-conics-meta", lambda: isect(conics=_m("conics"), opacities=_s("opac2d")), ValueError, "conics is on meta but means2d is on cpu"),
    ("isect-conics-nan", lambda: isect(conics=_poke(_s("conics"), NAN), opacities=_s("opac2d")), ValueError, "conics must be finite"),
    ("isect-opac-inf", lambda: isect(conics=_s("conics"), opacities=_poke(_s("opac2d"), INF)), ValueError, "opacities must be finite"),
    ("isect-opac-above", lambda: isect(conics=_s("conics"), opacities=_s("opac2d") + 1), ValueError, r"opacities must lie in \[0, 1\]"),
    ("isect-max-negative", lambda: isect(max_intersections=-1), ValueError, "max_intersections must be >= 0"),
    ("isect-max-float", lambda: isect(max_intersections=1e9), TypeError, "max_intersections must be an int"),
    ("isect-max-exceeded", lambda: isect(conics=_s("conics"), opacities=_s("opac2d"), max_intersections=0), ValueError, r"more than max_intersections = 0"),
    # -- isect_offset_encode -------------------------------------------------
    ("enc-ids-list", lambda: encode(isect_ids=[0, 1]), TypeError, "isect_ids must be a torch.Tensor"),
    ("enc-ids-int32", lambda: encode(isect_ids=_s("ids").int()), TypeError, "isect_ids must be int64"),
    ("enc-ids-float", lambda: encode(isect_ids=_s("ids").double()), TypeError, "isect_ids must be int64"),
    ("enc-ids-bool", lambda: encode(isect_ids=_s("ids").bool()), TypeError, "isect_ids must be int64"),
    ("enc-ids-dims", lambda: encode(isect_ids=_s("ids")[None]), ValueError, r"isect_ids must have shape \[\*\]"),
    ("enc-n-images-zero", lambda: encode(n_images=0), ValueError, "n_images must be >= 1"),
    ("enc-n-images-float", lambda: encode(n_images=2.0), TypeError, "n_images must be an int"),
    ("enc-n-images-numpy", lambda: encode(n_images=np.float32(2)), TypeError, "n_images must be an int"),
    ("enc-tile-width-neg", lambda: encode(tile_width=-1), ValueError, "tile_width must be >= 1"),
    ("enc-unsorted", lambda: encode(isect_ids=_s("ids").flip(0)), ValueError, r"isect_ids must be sorted"),
    ("enc-camera-past", lambda: encode(n_images=1), ValueError, r"isect_ids must hold cameras in \[0, n_images\) = \[0, 1\)"),
    ("enc-camera-negative", lambda: encode(isect_ids=torch.cat([torch.tensor([-(1 << 40)]), _s("ids")])), ValueError, "isect_ids must hold cameras.*has camera -"),
    ("enc-tile-past", lambda: encode(isect_ids=torch.tensor([1 << 32, 3 << 32]), n_images=1, tile_width=3, tile_height=1), ValueError, r"isect_ids must hold tiles in \[0, tile_width \* tile_height\)"),
    ("enc-too-large", lambda: encode(n_images=10**6, tile_width=10**6, tile_height=10**3), ValueError, "n_images x tile_width x tile_height is too large"),
    # -- rasterize_to_pixels -------------------------------------------------
    ("blend-means2d-list", lambda: blend(means2d=_s("means2d").tolist()), TypeError, "means2d must be a torch.Tensor"),
    ("blend-colors-int", lambda: blend(colors=(_s("colors2d") * 9).long()), TypeError, "colors must be float32"),
    ("blend-opac-bool", lambda: blend(opacities=_s("opac2d") > 0.5), TypeError, "opacities must be float32"),
    ("blend-conics-complex", lambda: blend(conics=_s("conics").to(torch.cfloat)), TypeError, "conics must be float32"),
    ("blend-colors-dtype", lambda: blend(colors=_s("colors2d").double()), TypeError, "colors has dtype torch.float64 but means2d"),
    ("blend-fids-int64", lambda: blend(flatten_ids=_s("fids").long()), TypeError, "flatten_ids must be int32"),
    ("blend-offsets-float", lambda: blend(isect_offsets=_s("offsets").float()), TypeError, "isect_offsets must be int32"),
    ("blend-bg-list", lambda: blend(backgrounds=[0.0, 0.0, 0.0]), TypeError, "backgrounds must be a torch.Tensor"),
    ("blend-means2d-dims", lambda: blend(means2d=_s("means2d")[0]), ValueError, r"means2d must have shape \[\*, \*, 2\]"),
    ("blend-conics-size", lambda: blend(conics=_s("conics")[..., :2]), ValueError, r"conics must have shape \[2, 10, 3\]"),
    ("blend-colors-dims", lambda: blend(colors=_s("colors2d")[0]), ValueError, r"colors must have shape \[2, 10, \*\]"),
    ("blend-opac-size", lambda: blend(opacities=_s("opac2d")[:, :4]), ValueError, r"opacities must have shape \[2, 10\]"),
    ("blend-bg-size", lambda: blend(backgrounds=torch.rand(2, 4)), ValueError, r"backgrounds must have shape \[2, 3\]"),
    ("blend-offsets-grid", lambda: blend(tile_size=4), ValueError, r"isect_offsets must have shape \[2, 3, 4\]"),
    ("blend-fids-dims", lambda: blend(flatten_ids=_s("fids")[None]), ValueError, r"flatten_ids must have shape \[\*\]"),
    ("blend-no-camera", lambda: blend(means2d=torch.zeros(0, 10, 2)), ValueError, "means2d must hold at least one camera"),
    ("blend-opac-meta", lambda: blend(opacities=_m("opac2d")), ValueError, "opacities is on meta but means2d is on cpu"),
    ("blend-fids-meta", lambda: blend(flatten_ids=_m("fids")), ValueError, "flatten_ids is on meta"),
    ("blend-width-float", lambda: blend(width=16.5), TypeError, "width must be an int"),
    ("blend-tile-size-zero", lambda: blend(tile_size=0), ValueError, "tile_size must be >= 1"),
    # A tile far larger than the image: the padded grid would not fit in memory.
    ("blend-tile-size-huge", lambda: blend(tile_size=1 << 24, isect_offsets=torch.zeros(2, 1, 1, dtype=torch.int32)), ValueError, "width x height .* tile_size=16777216.* is too large"),
    ("blend-fids-negative", lambda: blend(flatten_ids=_s("fids") - 1), ValueError, r"flatten_ids must lie in \[0, 19\]"),
    ("blend-fids-past", lambda: blend(flatten_ids=_s("fids") + 20), ValueError, r"flatten_ids must lie in \[0, 19\]"),
    ("blend-fids-no-gaussians", lambda: blend( means2d=torch.zeros(2, 0, 2), conics=torch.zeros(2, 0, 3), colors=torch.zeros(2, 0, 3), opacities=torch.zeros(2, 0), ), ValueError, "flatten_ids must be empty when there are no Gaussians"),
    ("blend-offsets-decreasing", lambda: blend(isect_offsets=_s("offsets").flip(-1).contiguous()), ValueError, "isect_offsets must be non-decreasing"),
    ("blend-offsets-past", lambda: blend(isect_offsets=_s("offsets") + 1000), ValueError, r"isect_offsets must be non-decreasing .* \[0, M\]"),
    ("blend-opac-above", lambda: blend(opacities=_s("opac2d") * 3), ValueError, r"opacities must lie in \[0, 1\]"),
    ("blend-opac-below", lambda: blend(opacities=-_s("opac2d")), ValueError, r"opacities must lie in \[0, 1\]"),
    ("blend-means2d-nan", lambda: blend(means2d=_poke(_s("means2d"), NAN)), ValueError, "means2d must be finite"),
    ("blend-conics-inf", lambda: blend(conics=_poke(_s("conics"), INF)), ValueError, "conics must be finite"),
    ("blend-colors-nan", lambda: blend(colors=_poke(_s("colors2d"), NAN)), ValueError, "colors must be finite"),
    ("blend-opac-nan", lambda: blend(opacities=_poke(_s("opac2d"), NAN)), ValueError, "opacities must be finite"),
    ("blend-bg-nan", lambda: blend(backgrounds=_poke(_s("bg"), NAN)), ValueError, "backgrounds must be finite"),
    # -- rasterization -------------------------------------------------------
    ("render-colors-str", lambda: render(colors="red"), TypeError, "colors must be a torch.Tensor"),
    ("render-colors-int", lambda: render(colors=torch.ones(10, 3, dtype=torch.int64)), TypeError, "colors must be float32"),
    ("render-colors-bool", lambda: render(colors=torch.ones(10, 3, dtype=torch.bool)), TypeError, "colors must be float32"),
    ("render-means-complex", lambda: render(means=_s("means").to(torch.cfloat)), TypeError, "means must be float32"),
    ("render-colors-dtype", lambda: render(colors=_s("colors").double()), TypeError, "colors has dtype"),
    ("render-colors-dims", lambda: render(colors=torch.rand(10)), ValueError, r"colors must have shape \[10, \*\] or \[2, 10, \*\]"),
    ("render-colors-size", lambda: render(colors=torch.rand(11, 3)), ValueError, r"colors must have shape \[10, \*\]"),
    ("render-sh-dims", lambda: render(colors=_s("colors"), sh_degree=1), ValueError, r"colors must have shape \[10, \*, 3\].*SH coefficients"),
    ("render-sh-bases", lambda: render(colors=_s("sh"), sh_degree=2), ValueError, "colors has 4 SH bases but sh_degree 2 needs 9"),
    ("render-sh-degree", lambda: render(colors=_s("sh"), sh_degree=4), ValueError, r"sh_degree must be in \[0, 3\]"),
    ("render-sh-degree-str", lambda: render(colors=_s("sh"), sh_degree="1"), TypeError, "sh_degree must be an int"),
    ("render-sh-singular", lambda: render(colors=_s("sh"), sh_degree=1, viewmats=torch.zeros(2, 4, 4)), ValueError, r"viewmats must be invertible .*viewmats\[0\]"),
    ("render-bg-size", lambda: render(backgrounds=torch.rand(2, 4)), ValueError, r"backgrounds must have shape \[2, 3\]"),
    ("render-bg-meta", lambda: render(backgrounds=torch.rand(2, 3, device=META)), ValueError, "backgrounds is on meta"),
    ("render-colors-meta", lambda: render(colors=_m("colors")), ValueError, "colors is on meta but means is on cpu"),
    ("render-all-meta", lambda: render(**_all_meta("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks")), ValueError, "means is a meta tensor"),
    ("render-mode", lambda: render(render_mode="RGBD"), ValueError, "render_mode must be one of"),
    ("render-mode-list", lambda: render(render_mode=["RGB"]), ValueError, "render_mode must be one of"),
    ("render-raster-mode", lambda: render(rasterize_mode="mip"), ValueError, "rasterize_mode must be one of"),
    ("render-tile-size-float", lambda: render(tile_size=16.0), TypeError, "tile_size must be an int"),
    ("render-too-large", lambda: render(width=10**6, height=10**6), ValueError, r"width x height \(1000000 x 1000000.* is too large"),
    ("render-colors-nan", lambda: render(colors=_poke(_s("colors"), NAN)), ValueError, "colors must be finite"),
    ("render-sh-inf", lambda: render(colors=_poke(_s("sh"), INF), sh_degree=1), ValueError, "colors must be finite"),
    ("render-bg-inf", lambda: render(backgrounds=_poke(_s("bg"), INF)), ValueError, "backgrounds must be finite"),
    ("render-means-nan", lambda: render(means=_poke(_s("means"), NAN)), ValueError, "means must be finite"),
    ("render-scales-nan", lambda: render(scales=_poke(_s("scales"), NAN)), ValueError, "scales must be finite"),
    ("render-opac-range", lambda: render(opacities=_s("opacities") - 2), ValueError, r"opacities must lie in \[0, 1\]"),
    ("render-far-below-near", lambda: render(near_plane=1.0, far_plane=0.5), ValueError, "far_plane must be > near_plane"),
    ("render-max-intersections", lambda: render(max_intersections=0), ValueError, r"more than max_intersections = 0"),
    ("render-max-intersections-str", lambda: render(max_intersections="9"), TypeError, "max_intersections must be an int"),
    ("render-backend", lambda: render(backend=1), ValueError, "backend must be one of"),
]
# fmt: on


@pytest.mark.parametrize("fn,exc,match", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_every_public_function_has_rows():
    prefixes = {c[0].split("-")[0] for c in CASES}
    assert prefixes == {"proj", "sh", "isect", "enc", "blend", "render"}


# ---------------------------------------------------------------------------
# edge inputs that must work
# ---------------------------------------------------------------------------
def test_empty_sizes_work():
    s = _scene()
    # No Gaussians: nothing projects, nothing is drawn but the background.
    radii, m2d, z, con, comp = project(means=s["means"][:0], quats=s["quats"][:0], scales=s["scales"][:0],
                                       opacities=s["opacities"][:0])  # fmt: skip
    assert radii.shape == (2, 0, 2) and con.shape == (2, 0, 3)
    img, alpha, meta = render(means=s["means"][:0], quats=s["quats"][:0], scales=s["scales"][:0],
                              opacities=s["opacities"][:0], colors=s["colors"][:0], backgrounds=s["bg"])  # fmt: skip
    assert torch.equal(img, s["bg"][:, None, None, :].expand(2, H, W, 3)) and (alpha == 0).all()
    assert meta["isect_ids"].numel() == 0
    # No colour channels: the alphas alone (and the depth channel of RGB+D).
    img, alpha, _ = render(colors=s["colors"][:, :0])
    assert img.shape == (2, H, W, 0) and alpha.shape == (2, H, W, 1)
    img, _, _ = render(colors=s["colors"][:, :0], render_mode="RGB+D")
    assert img.shape == (2, H, W, 1)
    assert sh(dirs=s["dirs"][:0], coeffs=s["coeffs"][:0]).shape == (0, 3)
    tpg, ids, fids = isect(means2d=s["means2d"][:, :0], radii=s["radii"][:, :0], depths=s["depths"][:, :0])
    assert tpg.shape == (2, 0) and ids.numel() == 0 and fids.numel() == 0
    assert torch.equal(encode(isect_ids=ids), torch.zeros(2, TH, TW, dtype=torch.int32))
    # One pixel, a tile larger than the image, a far plane at infinity.
    img, _, _ = render(width=1, height=1, tile_size=64, far_plane=math.inf)
    assert img.shape == (2, 1, 1, 3) and torch.isfinite(img).all()


def test_meta_inputs_give_meta_outputs_where_no_value_decides_a_shape():
    # Value checks are skipped where there are no values; the fakes answer.
    s = _scene()
    out = ff.project_gaussians(*(s[n].to(META) for n in ("means", "quats", "scales", "opacities", "viewmats", "Ks")),
                               W, H)  # fmt: skip
    assert all(t.device.type == "meta" for t in out)
    assert out[0].shape == (2, 10, 2) and out[0].dtype == torch.int32 and out[3].shape == (2, 10, 3)
    assert ff.spherical_harmonics(1, _m("dirs"), _m("coeffs")).shape == (10, 3)
    assert ff.isect_offset_encode(_m("ids"), 2, TW, TH).shape == (2, TH, TW)
    rc, ra = ff.rasterize_to_pixels(_m("means2d"), _m("conics"), _m("colors2d"), _m("opac2d"), W, H, TS, _m("offsets"),
                                    _m("fids"))  # fmt: skip
    assert rc.device.type == "meta" and rc.shape == (2, H, W, 3) and ra.shape == (2, H, W, 1)


def test_numpy_scalars_are_accepted():
    s = _scene()
    a = (s["means"], s["quats"], s["scales"], s["opacities"], s["colors"], s["viewmats"], s["Ks"])
    x, _, _ = ff.rasterization(*a, np.int64(W), np.int32(H), np.float32(0.01), eps2d=np.float64(0.3),
                               tile_size=np.int64(8))  # fmt: skip
    y, _, _ = ff.rasterization(*a, W, H, 0.01, eps2d=0.3, tile_size=8)
    assert torch.equal(x, y)


# ---------------------------------------------------------------------------
# NaN: refused everywhere, eager and compiled, so no output ever holds one
# ---------------------------------------------------------------------------
def _compiled(fn):
    ff.backends()  # probe the install outside the trace
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def test_nan_is_refused_inside_compiled_graphs():
    s = _scene()
    proj = _compiled(
        lambda means, scales: ff.project_gaussians(
            means, s["quats"], scales, s["opacities"], s["viewmats"], s["Ks"], W, H
        )[1].sum()
    )
    assert torch.isfinite(proj(s["means"], s["scales"]))
    with pytest.raises(ValueError, match="means must be finite"):
        proj(_poke(s["means"], NAN), s["scales"])
    with pytest.raises(ValueError, match="scales must be positive"):
        proj(s["means"], -s["scales"])

    harm = _compiled(
        lambda dirs, coeffs: ff.spherical_harmonics(1, dirs, coeffs, torch.ones(10, dtype=torch.bool))
    )
    assert torch.isfinite(harm(s["dirs"], s["coeffs"])).all()
    with pytest.raises(ValueError, match="coeffs must be finite"):
        harm(s["dirs"], _poke(s["coeffs"], NAN))

    enc = _compiled(lambda ids: ff.isect_offset_encode(ids, 2, TW, TH))
    assert torch.equal(enc(s["ids"]), ref.isect_offset_encode(s["ids"], 2, TW, TH))
    with pytest.raises(ValueError, match="isect_ids must be sorted"):
        enc(s["ids"].flip(0))

    def draw(colors, bg):
        return ff.rasterize_to_pixels(s["means2d"], s["conics"], colors, s["opac2d"], W, H, TS, s["offsets"],
                                      s["fids"], bg)[0].sum()  # fmt: skip

    draw_c = _compiled(draw)
    assert torch.isfinite(draw_c(s["colors2d"], s["bg"]))
    with pytest.raises(ValueError, match="colors must be finite"):
        draw_c(_poke(s["colors2d"], NAN), s["bg"])
    with pytest.raises(ValueError, match="backgrounds must be finite"):
        draw_c(s["colors2d"], _poke(s["bg"], NAN))


def test_data_dependent_stages_refuse_nan_inside_compiled_graphs():
    # The number of overlaps is data-dependent: the compiled graphs have a
    # dynamic output size (so no fullgraph), and the op bodies still check
    # their values.  Inside a graph the stage op names its own argument.
    s = _scene()
    torch._dynamo.reset()
    ff.backends()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        fn = torch.compile(
            lambda m2d, z: ff.isect_tiles(m2d, s["radii"], z, TS, TW, TH)[1], backend="aot_eager"
        )
        assert torch.equal(fn(s["means2d"], s["depths"]), s["ids"])
        with pytest.raises(ValueError, match="depths must be finite"):
            fn(s["means2d"], _poke(s["depths"], NAN))

        def draw(means, sh):
            return ff.rasterization(means, s["quats"], s["scales"], s["opacities"], sh, s["viewmats"], s["Ks"], W, H,
                                    sh_degree=1, tile_size=TS)[0]  # fmt: skip

        draw_c = torch.compile(draw, backend="aot_eager")
        assert torch.equal(draw_c(s["means"], s["sh"]), draw(s["means"], s["sh"]))
        with pytest.raises(ValueError, match="means must be finite"):
            draw_c(_poke(s["means"], NAN), s["sh"])
        with pytest.raises(ValueError, match="coeffs must be finite"):
            draw_c(s["means"], _poke(s["sh"], INF))


@pytest.mark.parametrize("name", ["means", "quats", "scales", "opacities", "colors", "viewmats", "Ks"])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_nan_never_reaches_the_images(name, value):
    s = _scene()
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        render(**{name: _poke(s[name], value)})
