"""SIM's training-time machinery around a CondInst student: teacher, prototypes, pseudo masks, losses.

The student stays a plain CondInst (inference is unchanged); this module only adds loss terms and owns
the state that must survive a resume (teacher weights, prototypes)."""
from __future__ import annotations

import math
import random

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from ...config import Config
from .. import boxinst_loss
from ..color import neighbour_cosine, unfold_neighbours
from ..condinst import CondInst, box_cells, gt_masks_on_grid
from ..criterion import pairwise_cut_on
from ..dynamic_mask_head import aligned_bilinear
from .copy_paste import MemoryBank, box_pixel_masks, paste_batch
from .photometric import strong_photometric
from .prototypes import Prototypes
from .pseudo_loss import (adaptive_high_threshold, cut_sides, fuse, margin_ignored, pseudo_mask_loss, pseudo_targets,
                          region_weight, rim_targets, soft_targets, split_pairs)
from .self_correction import claimed_by_rivals, merge_masks, merge_per_object
from .teacher import EMATeacher
from .texture_map import background_ring, texture_contrast, texture_map, texture_split

# the stride of the backbone body's C2 output (its last stride-4 block)
C2_STRIDE = 4
# the texture map's background outside the box: this many mask cells around it (16 px at stride 4)
TEXTURE_RING = 4


def select_pixels_on_host(device: torch.device) -> bool:
    """Whether the prototype update takes its pixels by index (a host sync, several times less work)
    rather than masking all pixels of every object. On a GPU a host sync stalls the launch queue; on a
    CPU it costs nothing."""
    return device.type == "cpu"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def erode(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """Boolean masks [G, h, w] eroded by a (2 radius + 1)^2 square (the canvas edge does not erode)."""
    k = 2 * radius + 1
    return -F.max_pool2d(-masks.float()[:, None], k, stride=1, padding=radius)[:, 0] > 0.5


class SIM(nn.Module):
    def __init__(self, cfg: Config, student: CondInst, num_classes: int):
        super().__init__()
        s = cfg.sim
        self.cfg = cfg
        self.teacher = EMATeacher(student, s.ema_momentum, s.teacher_backbone, s.ema_warmup)
        self.prototypes = Prototypes(num_classes, s.num_prototypes, cfg.model.mask_out_channels, s.proto_momentum,
                                     s.sinkhorn_eps, s.sinkhorn_iters, s.bg_prototypes, s.proto_warmup)
        # always present (empty unless copy-paste is on) so every sim checkpoint has the same keys
        self.bank = MemoryBank(s.bank_length)

    @torch.no_grad()
    def after_step(self, student: nn.Module) -> None:
        self.teacher.update(student)

    @torch.no_grad()
    def prepare_batch(self, batch: dict, iteration: int, seed: int) -> dict:
        """What a training step learns from: the batch after copy-paste and, with ``student_aug``, with a
        strongly augmented copy of its images under ``student_images`` (what the student sees; ``images``
        stay clean for the teacher and the colour affinities), flagged ``pairwise_elsewhere`` when SIM computes
        the pairwise term itself this step. A pure function of (seed, iteration, rank)."""
        batch = self.copy_paste(batch, iteration, seed)
        s = self.cfg.sim
        if s.pairwise_feat_sim or s.pairwise_texture_thresh > 0 or pairwise_cut_on(self.cfg, iteration):
            # SIM's own pairwise term replaces the colour one this step (losses()): CondInst skips its own
            batch = {**batch, "pairwise_elsewhere": True}
        if self.cfg.sim.student_aug:
            # a string seed is hashed (sha512), not Python's per-process hash: the same draw in every run
            rng = random.Random(f"student_aug/{seed}/{iteration}/{_rank()}")
            batch = {**batch, "student_images": strong_photometric(batch["images"], batch["image_sizes"], rng)}
        return batch

    @torch.no_grad()
    def copy_paste(self, batch: dict, iteration: int, seed: int) -> dict:
        """The batch with bank objects pasted in (probability ``paste_prob`` once the bank is full), else
        the batch itself. The draw is a pure function of (seed, iteration, rank), so a resumed run pastes
        exactly what an uninterrupted one would."""
        s = self.cfg.sim
        if not s.copy_paste or not self.bank.full():
            return batch
        g = torch.Generator().manual_seed((seed * 1_000_003 + iteration) * 1009 + _rank())
        if float(torch.rand((), generator=g)) >= s.paste_prob:
            return batch
        return paste_batch(batch, self.bank, g, s.paste_fraction, s.paste_min, s.paste_max,
                           s.paste_replacement, s.paste_score_power)

    def _upsampled(self, mask_feats: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Stride-8 features (mask features, C3) -> mask resolution (aligned bilinear x2)."""
        factor = self.cfg.model.fpn_strides[0] // self.cfg.model.mask_out_stride
        return aligned_bilinear(mask_feats, factor)[:, :, : hw[0], : hw[1]]

    def low_level(self, aux: dict, name: str, hw: tuple[int, int]) -> torch.Tensor:
        """The backbone body's ``c3`` (stride 8) or ``c2`` (stride 4) output, detached, on the mask grid
        ``hw``: C3 upsampled as the mask features are; C2 as it is at the default mask stride 4, averaged
        over each cell of a coarser grid (``model.mask_out_stride=8``), upsampled for a finer one."""
        f = aux["out"][name].detach().float()
        if name == "c3":
            return self._upsampled(f, hw)
        mos = self.cfg.model.mask_out_stride
        if mos > C2_STRIDE:
            f = F.avg_pool2d(f, mos // C2_STRIDE)
        return aligned_bilinear(f, max(C2_STRIDE // mos, 1))[:, :, : hw[0], : hw[1]]

    @torch.no_grad()
    def pseudo_masks(self, batch: dict, aux: dict, teacher_features: bool = False) -> dict:
        """Per-object maps on the mask grid: instance map M_I (teacher masks of the positives, weighted),
        semantic map M_S, fused P, pseudo target/weights, and the student's own merged masks.
        ``teacher_features``: keep the teacher's mask features (``teacher_feats``) even where no option of
        the config needs them (for probes)."""
        s = self.cfg.sim
        inst = aux["inst"]
        logits = aux["mask_logits"]
        h, w = logits.shape[-2:]
        with record_function("boxmask.sim.teacher"):
            t_out = self.teacher(batch["images"], aux["out"]["fpn"])
            t_probs = self.teacher.model.instance_mask_logits(t_out, inst["image"], inst["loc"]).float().sigmoid()[:, 0]
        # one map per object of the batch (those without positives: M_I = 0, left out of losses and
        # statistics), so no data-dependent shapes
        num_g = aux["gt_boxes"].shape[0]
        groups, group, weights, m_i = merge_per_object(inst, t_probs, s.mu, s.weighting, num_g)
        has_pos = torch.zeros(num_g, dtype=torch.bool, device=logits.device).index_fill_(0, group, True)
        g_img, g_cls = aux["gt_image"], aux["gt_labels"]
        box = aux["object_box_masks"]  # the box, or what copy-paste left of it
        # the teacher's features at mask resolution serve the semantic map and the feature pairwise term (and
        # probes that ask for them) only
        need_feats = s.semantic or s.pairwise_feat_sim or teacher_features
        t_feats = self._upsampled(t_out["mask_feats"].float(), (h, w)) if need_feats else None
        z_t = F.normalize(t_feats, dim=1) if s.semantic else None
        m_s = self.prototypes.semantic_map(z_t[g_img], g_cls, s.tau, s.semantic_softmax) if s.semantic else None
        fused = fuse(m_s, m_i if s.self_correction else None, s.alpha if s.semantic else 1.0)
        n_pos = ((m_i > s.fg_thresh) & (box > 0)).flatten(1).sum(1)
        tau_high = adaptive_high_threshold(fused, box, n_pos, s.tau_high_min, s.tau_high_max)
        m_t = None
        if s.texture_map:
            with record_function("boxmask.sim.texture_map"):
                m_t, fused = self._with_texture(aux, fused, box, tau_high, g_img, (h, w))
            tau_high = adaptive_high_threshold(fused, box, n_pos, s.tau_high_min, s.tau_high_max)
        target, weight = pseudo_targets(fused, box, tau_high, s.tau_low)
        weight = margin_ignored(target, weight, s.pseudo_bg_margin)
        claimed = None
        if s.instance_competition:
            claimed = claimed_by_rivals(m_i, box, g_img, batch["images"].shape[0], s.fg_thresh)
            target, weight = target.masked_fill(claimed, 0.0), weight.masked_fill(claimed, 1.0)
        # what the pseudo loss pulls the confident pixels to: M_hat, or the fused map itself
        loss_target = target
        if s.pseudo_target != "hard":
            soft = soft_targets(fused, box, claimed)
            loss_target = soft if s.pseudo_target == "soft" else rim_targets(
                target, weight, box, soft, s.pseudo_rim, "soft" if s.pseudo_target == "soft_rim" else "hard")
        # the teacher's own maps, before mask-supervised objects take their GT (what the GT can measure)
        out = {"teacher_m_i": m_i, "pseudo_target": target, "pseudo_weight": weight}
        g_has = aux.get("object_has_mask")
        if g_has is not None:
            # a mask-supervised object's best mask is its GT mask: prototype pixels, bank (no pseudo loss)
            gt = gt_masks_on_grid(batch, self.cfg.model.mask_out_stride, (h, w)).float() * box
            sel = g_has[:, None, None]
            m_i, target, weight = torch.where(sel, gt, m_i), torch.where(sel, gt, target), torch.where(sel, box, weight)
            loss_target = torch.where(sel, gt, loss_target)
            out["gt"] = gt
        student = merge_masks(logits.detach().float().sigmoid()[:, 0], weights, group, num_g)
        out.update({"groups": groups, "group": group, "has_pos": has_pos, "image": g_img, "cls": g_cls, "box": box,
                    "m_i": m_i, "m_s": m_s, "fused": fused, "target": target, "weight": weight, "tau_high": tau_high,
                    "loss_target": loss_target, "m_t": m_t,
                    "student": student, "teacher_feats": t_feats, "teacher_z": z_t, "claimed": claimed})
        return out

    def _with_texture(self, aux: dict, fused: torch.Tensor, box: torch.Tensor, tau_high: torch.Tensor,
                      g_img: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The texture map M_T of every object (its own cells: the pseudo foreground of ``fused``; its
        background: the confident in-box background and a ring outside the box) and the map fused with it;
        an object with too few cells on either side keeps ``fused``."""
        s = self.cfg.sim
        feats = self.low_level(aux, "c3", hw)
        in_box = box > 0
        fg = (fused >= tau_high[:, None, None]) & in_box
        bg = self._texture_background(fused, box)
        m_t, valid = texture_map(feats, g_img, fg, bg, box, s.texture_tau)
        mixed = (1.0 - s.texture_weight) * fused + s.texture_weight * m_t
        return m_t, torch.where(valid[:, None, None], mixed, fused)

    def losses(self, batch: dict, aux: dict, pseudo_on: bool, cut_on: bool | None = None,
               hard_on: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """SIM's loss terms (unweighted) and statistics for the log (NaN where there is nothing to measure);
        updates the prototypes and fills the bank. ``pseudo_on``: the self-training stage has begun (past
        ``warmup_frac``), whatever the pseudo loss's weight: with ``pseudo_weight=0`` copy-paste still runs.
        ``cut_on``: the pairwise cut acts at this step (``criterion.pairwise_cut_on``; None: whenever
        ``pairwise_pseudo_cut`` and ``pseudo_on``). ``hard_on``: the pseudo loss pulls to M_hat's 0/1 at
        this step whatever ``pseudo_target`` (``criterion.hard_targets_on``)."""
        s = self.cfg.sim
        logits = aux["mask_logits"]
        out: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}
        if logits.shape[0] == 0:
            zero = logits.sum() * 0.0
            return ({"loss_pseudo": zero, "loss_paste": zero} if s.copy_paste else {"loss_pseudo": zero}), stats
        pm = self.pseudo_masks(batch, aux)
        out["loss_pseudo"] = logits.sum() * 0.0
        # the pair affinity and split-pair count, when the hard-target gate makes them; the cut reuses them
        affinity = splits = None
        if pseudo_on and s.pseudo_weight > 0:
            target = pm["target"][pm["group"]]
            weight = region_weight(target, pm["weight"][pm["group"]], s.pseudo_region)
            # hard targets are M_hat itself: no second gather
            hard = hard_on or pm["loss_target"] is pm["target"]
            loss_target = target if hard else pm["loss_target"][pm["group"]]
            if not hard and s.hard_target_min_share > 0:
                # hard targets for the instances whose pseudo label splits that share of their linked pairs
                affinity = self._pair_affinity(aux, pm)
                splits = self._split_share(aux, pm, affinity)
                gate = splits[2] >= s.hard_target_min_share
                loss_target = torch.where(gate[:, None, None], target, loss_target)
                stats["hard_target_share"] = gate.float().mean()
            per_inst = pseudo_mask_loss(logits[:, 0], loss_target, weight, s.pseudo_loss)
            keep = self._pseudo_supervised(batch, aux)
            out["loss_pseudo"] = per_inst.mean() if keep is None else (per_inst * keep).sum() / keep.sum().clamp_min(1.0)
        cut = (s.pairwise_pseudo_cut and pseudo_on) if cut_on is None else (cut_on and s.pairwise_pseudo_cut)
        if s.pairwise_feat_sim or s.pairwise_texture_thresh > 0 or cut or batch.get("pairwise_elsewhere", False):
            out["loss_pairwise"] = self._pairwise(aux, pm, cut, stats, splits, affinity)
        if s.semantic and (pseudo_on or s.proto_from == "start"):
            with record_function("boxmask.sim.prototypes"):
                self._update_prototypes(batch, aux, pm)
        if s.copy_paste:
            out["loss_paste"] = self._paste_loss(batch, aux)
            if pseudo_on:
                with record_function("boxmask.sim.memory_bank"):
                    self._fill_bank(batch, aux, pm)
        stats.update(self._statistics(aux, pm))
        return out, stats

    @staticmethod
    def _pseudo_supervised(batch: dict, aux: dict) -> torch.Tensor | None:
        """Per instance, 1.0 where the pseudo loss applies: box-only objects that were not pasted (a
        mask-supervised object has its GT Dice, a pasted one the paste loss). None: every instance."""
        keep = None
        if "has_mask" in aux:
            keep = ~aux["has_mask"]
        if "region_masks_padded" in batch:
            pasted = torch.cat([t["pasted"] for t in batch["targets"]])[aux["inst"]["gt_global"]]
            keep = ~pasted if keep is None else keep & ~pasted
        return None if keep is None else keep.float()

    @staticmethod
    @torch.no_grad()
    def _statistics(aux: dict, pm: dict) -> dict[str, torch.Tensor]:
        """Tensors for the training log (no host sync): the shares of in-box pixels of the box-only objects
        with positives that are pseudo foreground / background / ignored; with mask-supervised objects in
        the batch, how the teacher's pseudo labels for them compare with their GT masks (``gt_*``: pooled
        pixel precision and recall of pseudo foreground and background; mean map value on GT foreground
        minus on GT background, for M_S, M_I and the fused map)."""
        g_has = aux.get("object_has_mask")
        box_only = pm["has_pos"] if g_has is None else pm["has_pos"] & ~g_has
        w_obj = box_only.float()[:, None, None]
        box = pm["box"] * w_obj
        in_box = box.sum()
        fg = (pm["target"] * w_obj).sum()
        bg = (pm["weight"] * w_obj).sum() - fg
        stats = {"pseudo_fg": fg / in_box.clamp_min(1), "pseudo_bg": bg / in_box.clamp_min(1),
                 "pseudo_ignored": 1 - (fg + bg) / in_box.clamp_min(1)}
        if g_has is None:
            return stats
        sel = (g_has & pm["has_pos"]).float()[:, None, None]
        box = pm["box"] * sel
        gt_fg = pm["gt"] * sel
        gt_bg = box - gt_fg
        p_fg = pm["pseudo_target"] * sel
        p_bg = (pm["pseudo_weight"] - pm["pseudo_target"]) * sel
        # 0 / 0 = NaN: nothing to measure in this batch (the log averages over the steps that had some)
        stats["gt_pseudo_fg_precision"] = (p_fg * gt_fg).sum() / p_fg.sum()
        stats["gt_pseudo_fg_recall"] = (p_fg * gt_fg).sum() / gt_fg.sum()
        stats["gt_pseudo_bg_precision"] = (p_bg * gt_bg).sum() / p_bg.sum()
        stats["gt_pseudo_bg_recall"] = (p_bg * gt_bg).sum() / gt_bg.sum()
        for name, m in (("m_s", pm["m_s"]), ("m_i", pm["teacher_m_i"]), ("fused", pm["fused"])):
            if m is not None:
                stats[f"gt_{name}_gap"] = (m * gt_fg).sum() / gt_fg.sum() - (m * gt_bg).sum() / gt_bg.sum()
        return stats

    def _paste_loss(self, batch: dict, aux: dict) -> torch.Tensor:
        """BCE + Dice of the pasted objects' masks against their (visible) paste masks; other objects: 0."""
        logits = aux["mask_logits"]
        if "region_masks_padded" not in batch:
            return logits.sum() * 0.0
        pasted = torch.cat([t["pasted"] for t in batch["targets"]])[aux["inst"]["gt_global"]]
        if not pasted.any():
            return logits.sum() * 0.0
        target = aux["box_masks"][pasted]
        per_inst = pseudo_mask_loss(logits[pasted, 0], target, torch.ones_like(target), "bce_dice")
        return per_inst.sum() / logits.shape[0]

    @torch.no_grad()
    def _fill_bank(self, batch: dict, aux: dict, pm: dict) -> None:
        """Push every image of the batch with its objects' paste masks: the merged teacher map upsampled
        to full resolution, > fg_thresh, inside the box (or what is left of it); score = mean
        probability inside the paste mask. Objects without positives get an empty mask, score 0."""
        s = self.cfg.sim
        images = batch["images"]
        hp, wp = images.shape[-2:]
        probs = aligned_bilinear(pm["m_i"][:, None], self.cfg.model.mask_out_stride)[:, 0, :hp, :wp]
        if "region_masks_padded" in batch:  # pm holds every object of the batch, in target order
            # a pasted object never goes back into the bank (it would be re-pasted again and again): empty
            # mask, score 0; the objects underneath keep what is visible of them
            pasted = torch.cat([t["pasted"] for t in batch["targets"]])
            regions = torch.cat(batch["region_masks_padded"]) & ~pasted[:, None, None]
        else:
            regions = box_pixel_masks(aux["gt_boxes"], hp, wp)
        masks = (probs > s.fg_thresh) & regions
        scores = (probs * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1.0)
        g_has = aux.get("object_has_mask")
        if g_has is not None:  # GT masks at full resolution, full confidence
            gt = torch.cat(batch["gt_masks_padded"]).bool() & regions
            masks = torch.where(g_has[:, None, None], gt, masks)
            scores = torch.where(g_has, 1.0, scores)
        # objects without positives: M_I = 0, so an empty mask and score 0. The bank lives on the host:
        # one transfer for the batch, then per-image pushes without device syncs
        images, masks, scores = images.cpu(), masks.cpu(), scores.float().cpu()
        boxes, labels = aux["gt_boxes"].cpu(), aux["gt_labels"].cpu()
        a = 0
        for i, n in enumerate(aux["gt_counts"]):
            h, w = batch["image_sizes"][i]
            self.bank.push(images[i, :, :h, :w], boxes[a:a + n], labels[a:a + n], masks[a:a + n, :h, :w], scores[a:a + n])
            a += n

    def _pairwise(self, aux: dict, pm: dict, cut: bool, stats: dict | None = None,
                  splits: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  affinity: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
        """The pairwise term with SIM's options: ``sim.pairwise_feat_sim`` (the released code's colour x
        teacher-feature similarity >= ``sim.pairwise_feat_thresh``) and ``cut`` (the pairs the pseudo label
        confidently splits left out, and with ``sim.pairwise_texture_split`` those across the object's texture
        contrast; the cut's gates by share and size act on both; ``stats["pairwise_cut"]``: the share of the
        term's pairs it leaves out)."""
        lc, s = self.cfg.loss, self.cfg.sim
        logits = aux["mask_logits"]
        box_masks = self._pairwise_boxes(aux)
        sim, thresh = affinity or self._pair_affinity(aux, pm)
        keep = None
        if cut:
            split, counted, share = splits or self._split_share(aux, pm, (sim, thresh))
            if s.pairwise_texture_split > 0:
                by_texture = self._texture_split(aux, pm)[pm["group"]]
                if stats is not None:
                    stats["pairwise_texture_split"] = (counted * by_texture).sum() / counted.sum().clamp_min(1.0)
                split = torch.maximum(split, by_texture)
            if s.pairwise_cut_min_share > 0:  # per instance: the share of its pairs the pseudo label splits
                split = split * (share >= s.pairwise_cut_min_share).to(split.dtype)[:, None, None, None]
            if s.pairwise_cut_min_side > 0:  # per instance: its box's shorter side on the mask grid
                side = torch.minimum(box_masks.amax(2).sum(1), box_masks.amax(1).sum(1))
                split = split * (side >= s.pairwise_cut_min_side).to(split.dtype)[:, None, None, None]
            keep = 1.0 - split
            if stats is not None:
                stats["pairwise_cut"] = (counted * split).sum() / counted.sum().clamp_min(1.0)
        return boxinst_loss.pairwise_loss(logits, sim[aux["inst"]["image"]], box_masks, thresh, lc.pairwise_size,
                                          lc.pairwise_dilation, keep)

    def _texture_background(self, fused: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        """Per object, the cells the texture map and the texture split take as its surroundings: the confident
        in-box background (fused map <= ``sim.tau_low``) and a ring outside the box."""
        return ((fused <= self.cfg.sim.tau_low) & (box > 0)) | background_ring(box, TEXTURE_RING)

    @torch.no_grad()
    def pseudo_texture_contrast(self, aux: dict, pm: dict, features: str = "c2") -> tuple[torch.Tensor, torch.Tensor]:
        """Per object, ``texture_contrast`` of the backbone's ``features`` (``c2``, or ``c3`` for probes) between
        its pseudo foreground and its surroundings (``_texture_background``): [G, h, w] and [G] valid."""
        box = pm["box"]
        fg = (pm["target"] > 0) & (pm["weight"] > 0) & (box > 0)
        feats = self.low_level(aux, features, box.shape[-2:])
        return texture_contrast(feats, pm["image"], fg, self._texture_background(pm["fused"], box))

    def _texture_split(self, aux: dict, pm: dict) -> torch.Tensor:
        """Per object [G, K, h, w]: the neighbour pairs on opposite sides of its texture contrast in C2
        (``sim.pairwise_texture_split``)."""
        s, lc = self.cfg.sim, self.cfg.loss
        contrast, valid = self.pseudo_texture_contrast(aux, pm)
        return texture_split(contrast, valid, s.pairwise_texture_split, lc.pairwise_size, lc.pairwise_dilation)

    @staticmethod
    def _pairwise_boxes(aux: dict) -> torch.Tensor:
        """Per instance, the box cells the pairwise term covers: mask-supervised objects keep their GT Dice
        only, as with the colour term."""
        box_masks = aux["box_masks"]
        if "has_mask" in aux:
            box_masks = box_masks * (~aux["has_mask"]).to(box_masks.dtype)[:, None, None]
        return box_masks

    def _pair_affinity(self, aux: dict, pm: dict) -> tuple[torch.Tensor, float]:
        """Per image, the pairwise term's neighbour affinity and the threshold that links a pair: colour,
        or colour x teacher-feature similarity with ``sim.pairwise_feat_sim``; with
        ``sim.pairwise_texture_thresh`` 0 where the backbone's features of the two disagree (C3, or C2 with
        ``sim.pairwise_texture_features=c2``)."""
        lc, s = self.cfg.loss, self.cfg.sim
        if not s.pairwise_feat_sim:
            affinity, thresh = aux["color_sim"], lc.pairwise_color_thresh
        else:
            f = pm["teacher_feats"]  # the teacher's mask features at mask resolution, not normalised
            diff = f[:, :, None] - unfold_neighbours(f, lc.pairwise_size, lc.pairwise_dilation)
            affinity = aux["color_sim"] * torch.exp(-torch.linalg.vector_norm(diff, dim=1))
            thresh = s.pairwise_feat_thresh
        if s.pairwise_texture_thresh > 0:
            f = self.low_level(aux, s.pairwise_texture_features, affinity.shape[-2:])
            cos = neighbour_cosine(F.normalize(f, dim=1), lc.pairwise_size, lc.pairwise_dilation)
            affinity = affinity * (cos >= s.pairwise_texture_thresh).to(affinity.dtype)
        return affinity, thresh

    @torch.no_grad()
    def _split_share(self, aux: dict, pm: dict, affinity: tuple[torch.Tensor, float] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per instance: the neighbour pairs the pseudo label confidently splits ([N, K, h, w], with the cut's
        confidence keys), the linked pairs in its box the pairwise term counts, and the share of the latter
        the former are (high where a colour-matched region borders the pseudo foreground). ``affinity``:
        ``_pair_affinity``'s answer, when the caller has it."""
        lc, s = self.cfg.loss, self.cfg.sim
        sim, thresh = affinity or self._pair_affinity(aux, pm)
        target, weight = cut_sides(pm["target"], pm["weight"], pm["fused"], pm["claimed"], s.pairwise_cut_high,
                                   s.pairwise_cut_low)
        split = split_pairs(target[pm["group"]], weight[pm["group"]], lc.pairwise_size, lc.pairwise_dilation)
        counted = (sim[aux["inst"]["image"]] >= thresh).float() * self._pairwise_boxes(aux)[:, None]
        share = (counted * split).flatten(1).sum(1) / counted.flatten(1).sum(1).clamp_min(1.0)
        return split, counted, share

    @torch.no_grad()
    def _update_prototypes(self, batch: dict, aux: dict, pm: dict) -> None:
        """Per class: pixels of its objects (pseudo foreground, or teacher M_I > threshold; optionally only
        confident M_I, eroded), Sinkhorn on teacher similarities, centroids of student features, EMA; the
        background prototypes likewise from the pixels outside every box; then sync across ranks."""
        s = self.cfg.sim
        h, w = pm["box"].shape[-2:]
        if s.proto_pixels == "mi":
            sel = (pm["m_i"] > s.fg_thresh) & (pm["box"] > 0)
        else:
            sel = pm["target"] > 0
        if s.proto_confidence > 0:
            sel = sel & (pm["m_i"] > s.proto_confidence)
        if s.proto_erode > 0:
            sel = erode(sel, s.proto_erode)
        z_s = F.normalize(self._upsampled(aux["out"]["mask_feats"].detach().float(), (h, w)), dim=1)
        z_t = pm["teacher_z"]
        # all classes in one update
        if select_pixels_on_host(sel.device):
            k, ys, xs = torch.nonzero(sel, as_tuple=True)
            imgs, classes, valid = pm["image"][k], pm["cls"][k], None
            feats_s, feats_t = z_s[imgs, :, ys, xs], z_t[imgs, :, ys, xs]
            scores = torch.einsum("nd,nld->nl", feats_t, self.prototypes.protos[classes])
        else:  # every pixel of every object, the selected ones valid
            g, d = sel.shape[0], z_s.shape[1]
            feats_s = z_s[pm["image"]].permute(0, 2, 3, 1).reshape(g * h * w, d)
            feats_t = z_t[pm["image"]].permute(0, 2, 3, 1).reshape(g, h * w, d)
            scores = torch.einsum("gpd,gld->gpl", feats_t, self.prototypes.protos[pm["cls"]]).reshape(g * h * w, -1)
            classes, valid = pm["cls"][:, None].expand(g, h * w).reshape(-1), sel.reshape(-1)
        self.prototypes.update(scores, feats_s, classes, valid)
        if self.prototypes.has_background:
            bg = self._certain_background(batch, aux, (h, w))
            bg_protos = self.prototypes.bg_protos
            if select_pixels_on_host(bg.device):
                b, ys, xs = torch.nonzero(bg, as_tuple=True)
                self.prototypes.update_background(z_t[b, :, ys, xs] @ bg_protos.t(), z_s[b, :, ys, xs])
            else:
                d = z_s.shape[1]
                self.prototypes.update_background(z_t.permute(0, 2, 3, 1).reshape(-1, d) @ bg_protos.t(),
                                                  z_s.permute(0, 2, 3, 1).reshape(-1, d), bg.reshape(-1))
        self.prototypes.sync()

    def _certain_background(self, batch: dict, aux: dict, hw: tuple[int, int]) -> torch.Tensor:
        """[B, h, w] bool: the mask-grid cells of each image (not its padding) outside every box."""
        stride = self.cfg.model.mask_out_stride
        h, w = hw
        images = batch["images"]
        cells = box_cells(aux["gt_boxes"], h, w, stride).float()
        covered = torch.zeros(images.shape[0], h, w, device=images.device).index_add_(0, aux["gt_image"], cells) > 0
        inside = torch.zeros(images.shape[0], h, w, dtype=torch.bool, device=images.device)
        for i, (ih, iw) in enumerate(batch["image_sizes"]):
            # cells whose centre (j * stride + stride // 2 + 0.5, as box_cells) lies in the image
            inside[i, : math.ceil((ih - stride // 2 - 0.5) / stride), : math.ceil((iw - stride // 2 - 0.5) / stride)] = True
        return inside & ~covered
