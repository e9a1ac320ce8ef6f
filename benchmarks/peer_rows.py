"""The rows of ``benchmarks/peer.py``: each memvae bottleneck and the vector-quantize-pytorch
module that does the same job.

Each row pairs a memvae bottleneck, a packaged config's ``[bottleneck]`` section
(``src/memvae/config/packaged/<row>.toml``) with its slots set to K, built by
``memvae.networks.autoencoder.build_bottleneck`` as training builds it, with the vector-quantize-pytorch
module that does the same job:

    vq                VectorQuantizer               VectorQuantize(learnable_codebook=True, ema_update=False)
    vq_ema            VectorQuantizerEMA            VectorQuantize(decay=0.99)                       (EMA)
    vq_ema_reseed     the same, reseed_threshold t  VectorQuantize(decay=0.99, threshold_ema_dead_code=t)
    memory_l2         MemoryRead, soft read,        VectorQuantize(learnable_codebook=True, ...): both
                      gradient write                train the slots by gradient
    memory_discrete   MemoryRead, relative          VectorQuantize(decay=0.99, threshold_ema_dead_code=t):
                      temperature, hard EMA write,  both write the slots as moving averages and
                      re-seeding t                  re-seed dead ones
    memory_discrete:  the same with the top-k read  the same peer
      top_k=16        of 16 slots per query
    fsq               FSQ                           FSQ(levels, dim=64): the same levels, with projections
    simvq             SimVQ                         SimVQ(dim=64, rotation_trick=False): frozen basis, learned
                                                    linear map, codebook + 0.25·commitment loss on both sides
    lfq               LFQ                           LFQ(dim=64, codebook_size=K, entropy_loss_weight=0.1,
                                                    commitment_loss_weight=0.25), called with inv_temperature 100
    bsq               LFQ(spherical=True)           LFQ(spherical=True, ..., commitment_loss_weight=0), called
                                                    with inv_temperature 1 (BSQ's τ = 1)
    ibq               IBQ                           no peer (vector-quantize-pytorch has no IBQ): its time is
                                                    set beside memvae's dense memory read, ``memory_l2:impl=dense``,
                                                    which computes the same N×K softmax and read (BOUND_RATIOS)

Every VectorQuantize gets dim=64, codebook_size=K, commitment_weight=0.25,
accept_image_fmap=True and ``rotation_trick=False``: memvae's reads pass the
straight-through gradient, and so does the peer then (its default, the rotation trick, is
a different estimator with extra work). FSQ's K is the product of its levels: 8,8,8 at
K = 512, 8,8,8,8 at 4096, 8,8,8,8,4 at 16384, on both sides. Any other packaged config
name makes a row too, paired by the same rules; one this memvae does not have, or cannot
load, is listed as skipped. A row ``name:key=value[:key=value...]`` is the config ``name``
with those ``[bottleneck]`` keys overridden.
"""
from __future__ import annotations

import dataclasses
import math

DIM = 64
SIDE = 8  # an 8×8 map of reads, as CIFAR-10's 32×32 images give with the study's encoder

# Rows: packaged config names (src/memvae/config/packaged); each row is that config's [bottleneck]
# section with slots set to K.
ROWS = ("vq", "vq_ema", "vq_ema_reseed", "memory_l2", "memory_discrete", "memory_discrete:top_k=16", "fsq",
        "simvq", "lfq", "bsq", "ibq", "memory_l2:impl=dense")


def row_config(name: str, k: int) -> tuple[dict | None, str | None]:
    """The packaged config ``name``'s [bottleneck] section at K = k, as a dict, or (None, why
    this memvae cannot run it). FSQ's levels are those of the config when their product is
    K, else 8s and one last factor (K = 4096: 8,8,8,8; 16384: 8,8,8,8,4). ``name`` may
    carry ``:key=value`` overrides of the section."""
    from memvae.config import presets
    from memvae.errors import MemvaeError

    name, *overrides = name.split(":")
    if name not in presets.names():
        return None, f"no packaged config {name!r} in this memvae"
    try:
        cfg = dataclasses.asdict(presets.load(name, [f"bottleneck.{o}" for o in overrides]).bottleneck)
    except MemvaeError as exc:
        return None, str(exc)
    cfg["slots"] = k
    if cfg["kind"] == "fsq" and math.prod(fsq_levels(cfg)) != k:
        levels, rest = [], k
        while rest % 8 == 0 and rest > 8:
            levels, rest = levels + [8], rest // 8
        cfg["levels"] = ",".join(map(str, levels + [rest]))
    return cfg, None


def fsq_levels(cfg: dict) -> list[int]:
    """The FSQ levels of a memvae FSQ config ("8,8,8")."""
    return [int(v) for v in cfg["levels"].split(",")]


def peer_spec(cfg: dict, k: int, positions: int) -> dict | None:
    """The vector-quantize-pytorch module that does the same work as the memvae config, for
    batches of ``positions`` rows (its dead-code threshold is a count, memvae's a fraction of N/K);
    None for a kind it does not have (IBQ). ``call``: keyword arguments of its forward."""
    if cfg["kind"] == "fsq":
        return {"class": "FSQ", "kwargs": {"levels": fsq_levels(cfg), "dim": DIM, "channel_first": True}}
    if cfg["kind"] == "ibq":
        return None
    if cfg["kind"] == "simvq":
        return {"class": "SimVQ", "kwargs": {"dim": DIM, "codebook_size": k, "channel_first": True, "rotation_trick": False,
                                             "input_to_quantize_commit_loss_weight": cfg["commitment"]}}
    if cfg["kind"] == "lfq":
        return {"class": "LFQ", "kwargs": {"dim": DIM, "codebook_size": k, "entropy_loss_weight": cfg["entropy_penalty"],
                                           "commitment_loss_weight": cfg["commitment"], "spherical": cfg["spherical"]},
                "call": {"inv_temperature": 1.0 / cfg["entropy_temperature"]}}
    kwargs = {"dim": DIM, "codebook_size": k, "commitment_weight": cfg.get("commitment", 0.25),
              "accept_image_fmap": True, "rotation_trick": False}
    gradient_write = cfg["kind"] == "vq" or (cfg["kind"] == "memory" and cfg.get("write", "gradient") == "gradient")
    if gradient_write:
        kwargs.update(learnable_codebook=True, ema_update=False)
    else:
        kwargs["decay"] = cfg.get("decay", 0.99)
        if cfg.get("reseed_fraction"):  # the same dead count: a fraction of the mean count N/K
            kwargs["threshold_ema_dead_code"] = cfg["reseed_fraction"] * positions / k
    return {"class": "VectorQuantize", "kwargs": kwargs}


def peer_name(spec: dict) -> str:
    """A short readable name of a peer module, used as its key in the results."""
    kw = spec["kwargs"]
    if spec["class"] in ("SimVQ", "LFQ"):
        return "LFQ(spherical=True)" if kw.get("spherical") else spec["class"]
    if spec["class"] == "FSQ":
        return "FSQ(levels=[" + ",".join(map(str, kw["levels"])) + "])"
    if kw.get("learnable_codebook"):
        return "VectorQuantize(learnable)"
    dead = kw.get("threshold_ema_dead_code")
    return f"VectorQuantize(ema, dead_code={dead:g})" if dead else "VectorQuantize(ema)"


def plan_rows(row_names: list[str], k: int, positions: int) -> tuple[list[dict], list[dict]]:
    """-> (rows: name, memvae config, peer spec, or skipped; distinct contestants to run)."""
    rows, contestants = [], {}
    for name in row_names:
        cfg, why = row_config(name, k)
        if cfg is None:
            rows.append({"row": name, "skipped": why})
            continue
        spec = peer_spec(cfg, k, positions)
        contestants[f"memvae:{name}"] = {"name": f"memvae:{name}", "side": "memvae", "config": cfg}
        if spec is None:  # timed alone, for the time ratios
            rows.append({"row": name, "config": cfg, "peer": None})
            continue
        peer = peer_name(spec)
        contestants.setdefault(f"peer:{peer}", {"name": f"peer:{peer}", "side": "peer", "peer": spec})
        rows.append({"row": name, "config": cfg, "peer": peer, "peer_spec": spec})
    if contestants:
        contestants["distance_matmul"] = {"name": "distance_matmul", "side": "matmul"}
    top_k = [row["config"]["top_k"] for row in rows if row.get("config", {}).get("top_k")]
    if top_k:  # the selection alone, at the first top-k row's k (see BOUND_RATIOS)
        contestants["top_k_select"] = {"name": "top_k_select", "side": "select", "top_k": top_k[0]}
    return rows, list(contestants.values())
