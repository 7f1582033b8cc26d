"""CondInst: backbone + FPN, FCOS head with controller, mask branch, dynamic mask head.

In training ``forward`` returns the unweighted loss terms selected by ``method`` (weights and ramps are
applied in ``criterion.py``); in eval it returns detections in original image coordinates."""
from __future__ import annotations

import contextlib
import itertools

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import batched_nms

from ..config import Config
from . import boxinst_loss
from .backbone import Backbone
from .bn_folding import FoldedCache
from .color import color_similarity, rgb_to_lab
from .dynamic_mask_head import DynamicMaskHead, aligned_bilinear, aligned_bilinear_above
from .fcos import FCOSHead, fcos_losses, ltrb_to_boxes
from .mask_branch import MaskBranch
from .targets import assign_image, centerness_target, compute_locations, level_size_ranges, topk_per_gt


class CondInst(nn.Module):
    def __init__(self, cfg: Config, num_classes: int):
        super().__init__()
        m = cfg.model
        self.cfg = cfg
        self.method = cfg.method
        self.num_classes = num_classes
        self.strides = list(m.fpn_strides)
        # Relative coordinates of level i are divided by its size of interest: the upper bound of its
        # object-size range, and twice the last bound for the open-ended top level (CondInst: 64 ... 1024).
        self.soi = [float(s) for s in m.sizes_of_interest[: len(self.strides) - 1]] + [float(m.sizes_of_interest[-1] * 2)]
        self.size_ranges = level_size_ranges(m.sizes_of_interest, len(self.strides))
        self.backbone = Backbone(m)
        self.mask_branch = MaskBranch(m.fpn_channels, m.mask_branch_channels, m.mask_branch_convs, m.mask_out_channels)
        self.mask_head = DynamicMaskHead(m.mask_out_channels, m.mask_head_channels, m.mask_head_layers)
        self.head = FCOSHead(
            m.fpn_channels, num_classes, m.head_convs, m.head_norm, m.prior_prob, self.strides,
            self.mask_head.default_params(), shared_init=m.mask_head_init == "shared",
            conv=m.head_conv,
        )
        self.register_buffer("pixel_mean", torch.tensor(cfg.data.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.data.pixel_std).view(1, 3, 1, 1), persistent=False)
        # per-level constants kept on the model's device, so no step copies them from the host
        self.register_buffer("level_strides", torch.tensor(self.strides, dtype=torch.float32), persistent=False)
        self.register_buffer("level_ranges", torch.tensor(self.size_ranges, dtype=torch.float32), persistent=False)
        self.register_buffer("level_soi", torch.tensor(self.soi, dtype=torch.float32), persistent=False)

    # ------------------------------------------------------------------ shared
    def head_outputs(self, images: torch.Tensor, params_only: bool = False) -> dict:
        """Backbone, FCOS head and mask branch on a uint8 batch; head outputs flattened over levels:
        cls [B, L, C], reg [B, L, 4] (pixels), ctr [B, L]; box_feats (per level, the controller's input);
        mask_feats [B, D, H/8, W/8]
        (``params_only``: see ``heads_on``); ``c2`` / ``c3`` the backbone body's stride-4 / stride-8 outputs."""
        x = ((images.float() - self.pixel_mean) / self.pixel_std).contiguous(memory_format=torch.channels_last)
        feats, low = self.backbone.levels_and_low(x)
        return {**self.heads_on(feats, params_only), **low}

    def heads_on(self, feats: list[torch.Tensor], params_only: bool = False) -> dict:
        """FCOS head and mask branch on FPN features (what ``head_outputs`` returns; ``fpn`` holds the
        features themselves). ``params_only``: no class, box or centerness outputs (what instance masks
        need, e.g. SIM's teacher). The controller's parameters are not computed at every location:
        ``instance_mask_logits`` evaluates its convolution on ``box_feats`` (the box tower's output per
        level) at the few instances it is asked for (at every location it would cost about one more tower
        convolution, and its backward pass as much again)."""
        if params_only:
            head = {"box_feats": [self.head.box_tower(x) for x in feats]}
        else:
            head = self.head.forward_dense(feats)
        locations, levels = self._locations(feats)
        out = {
            "box_feats": head["box_feats"], "mask_feats": self.mask_branch(feats[:3]),
            "locations": locations, "levels": levels, "level_sizes": [t.shape[-2] * t.shape[-1] for t in feats],
            "fpn": feats,
        }
        if not params_only:
            out.update(cls=self._flatten(head["cls"]), reg=self._flatten(head["reg"]), ctr=self._flatten(head["ctr"])[..., 0])
        return out

    def instance_mask_logits(self, out: dict, image_idx: torch.Tensor, loc_idx: torch.Tensor) -> torch.Tensor:
        """Mask logits [N, 1, H/s, W/s] of the instances at (image, location), s = mask_out_stride."""
        levels = out["levels"][loc_idx]
        params = self._params_at(out["box_feats"], levels, image_idx, loc_idx, out["level_sizes"])
        return self.mask_head(
            out["mask_feats"], self.strides[0], params, image_idx, out["locations"][loc_idx],
            self.level_soi[levels], self.cfg.model.mask_out_stride,
        )

    def _locations(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        locs, levels = [], []
        for lvl, t in enumerate(feats):
            h, w = t.shape[-2:]
            loc = compute_locations(h, w, self.strides[lvl], t.device)
            locs.append(loc)
            levels.append(torch.full((loc.shape[0],), lvl, dtype=torch.long, device=t.device))
        return torch.cat(locs), torch.cat(levels)

    @staticmethod
    def _flatten(maps: list[torch.Tensor]) -> torch.Tensor:
        """Per-level [B, K, h, w] -> [B, sum(h*w), K]."""
        return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)

    def forward(self, batch: dict, return_aux: bool = False):
        # training goes through forward (not forward_train directly) so that DDP sees it
        if self.training:
            return self.forward_train(batch, return_aux)
        return self.inference(batch)

    # ------------------------------------------------------------------ training
    def assign_targets(self, out: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """FCOS targets for every location: gt index (-1 = background), labels, ltrb, centerness."""
        locations, levels = out["locations"], out["levels"]
        strides_t = self.level_strides[levels]
        ranges_t = self.level_ranges[levels]
        gt_idx_all, reg_t_all, labels_all = [], [], []
        for t in targets:
            gi, rt = assign_image(locations, levels, strides_t, ranges_t, t["boxes"], self.cfg.model.center_sampling_radius)
            gt_idx_all.append(gi)
            reg_t_all.append(rt)
            if len(t["labels"]):
                labels_all.append(torch.where(gi >= 0, t["labels"][gi.clamp(min=0)], -1))
            else:
                labels_all.append(torch.full_like(gi, -1))
        gt_idx = torch.stack(gt_idx_all)  # [B, L]
        reg_t = torch.stack(reg_t_all)
        labels = torch.stack(labels_all)
        ctr_t = torch.where(labels >= 0, centerness_target(reg_t.reshape(-1, 4)).view(labels.shape), 0.0)
        return {"gt_idx": gt_idx, "labels": labels, "reg": reg_t, "ctr": ctr_t}

    def forward_train(self, batch: dict, return_aux: bool = False):
        """Unweighted loss terms; with ``return_aux`` also what training-only methods (SIM) build on:
        the head outputs, the instances fed to the mask head and their mask logits, box masks and
        colour similarities."""
        images = batch["images"]
        targets = batch["targets"]
        # SIM's student_aug: the student sees an augmented view; the colour affinities keep the clean images
        out = self.head_outputs(batch.get("student_images", images))
        tgt = self.assign_targets(out, targets)
        bsz = images.shape[0]
        pos = tgt["labels"] >= 0
        norms = torch.stack([pos.sum().float(), (tgt["ctr"] * pos).sum().float()])
        ctr_norm = None
        if self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # normalise by the mean positive count (and centerness sum) over the ranks: DDP's averaged
            # gradients then equal those of one process on the global batch (as AdelaiDet's reduce_sum)
            dist.all_reduce(norms)
            norms = norms / dist.get_world_size()
            ctr_norm = norms[1]
        loss = fcos_losses(
            out["cls"].reshape(-1, self.num_classes), out["reg"].reshape(-1, 4), out["ctr"].reshape(-1),
            out["locations"].repeat(bsz, 1), tgt["labels"].reshape(-1), tgt["reg"].reshape(-1, 4),
            tgt["ctr"].reshape(-1), norms[0].clamp(min=1.0), self.cfg.loss.focal_alpha, self.cfg.loss.focal_gamma, ctr_norm,
        )
        # per-object facts (objects in target order): built from host-side counts with an asynchronous copy
        counts = [len(t["boxes"]) for t in targets]
        offsets = host_to_device([0, *itertools.accumulate(counts)], images.device)
        gt_image = host_to_device([i for i, n in enumerate(counts) for _ in range(n)], images.device)
        all_boxes = torch.cat([t["boxes"] for t in targets]) if targets else images.new_zeros(0, 4).float()
        inst = self._select_instances(out["cls"], out["ctr"], tgt["gt_idx"], tgt["labels"], offsets, gt_image)
        inst["label"] = tgt["labels"][inst["image"], inst["loc"]]
        inst["box"] = all_boxes[inst["gt_global"]]
        mask_logits = self.instance_mask_logits(out, inst["image"], inst["loc"])
        mask_loss, extras = self._mask_losses(mask_logits, batch, inst)
        loss.update(mask_loss)
        if not return_aux:
            return loss
        inst["pred_box"] = ltrb_to_boxes(out["locations"][inst["loc"]], out["reg"][inst["image"], inst["loc"]].detach())
        aux = {"out": out, "inst": inst, "mask_logits": mask_logits, "gt_boxes": all_boxes, "gt_counts": counts,
               "gt_image": gt_image,
               "gt_labels": torch.cat([t["labels"] for t in targets]) if targets else offsets.new_zeros(0), **extras}
        return loss, aux

    def _select_instances(self, cls, ctr, gt_idx, labels, offsets, gt_image) -> dict[str, torch.Tensor]:
        """Positive locations fed to the mask head: top-k per GT (by class score x centerness), for the
        whole batch at once; the number selected is the step's one host sync."""
        b, num_loc = labels.shape
        pos = labels >= 0
        with torch.no_grad():
            score = cls.detach().gather(2, labels.clamp(min=0)[..., None])[..., 0].sigmoid() * ctr.detach().sigmoid()
        gt_global = torch.where(pos, offsets[:-1, None] + gt_idx, -1)
        keep = topk_per_gt(gt_global.flatten(), score.flatten(), self.cfg.model.max_proposals_per_image, gt_image, b)
        image, loc = torch.nonzero(keep.view(b, num_loc), as_tuple=True)
        return {"image": image, "loc": loc, "gt": gt_idx[image, loc], "gt_global": gt_global[image, loc]}

    def _mask_losses(self, logits: torch.Tensor, batch: dict, inst: dict) -> tuple[dict, dict]:
        """The mask terms of ``method`` and (for reuse) the box masks (per instance and per object) and
        colour similarities."""
        stride = self.cfg.model.mask_out_stride
        h, w = logits.shape[-2:]
        # method full needs the GT masks; without them (a boxes-only batch, e.g. mask-quality evaluation
        # or pseudo-labelling) the box losses stand in, which also yields the box masks SIM reads
        if self.method == "full" and "gt_masks_padded" in batch:
            if logits.shape[0] == 0:
                return {"loss_mask": logits.sum() * 0.0}, {}
            tgt = gt_masks_on_grid(batch, stride, (h, w))[inst["gt_global"]].float()
            return {"loss_mask": boxinst_loss.dice_loss(logits.sigmoid()[:, 0], tgt).mean()}, {}
        if "region_masks_padded" in batch:
            # a copy-paste composite: what remains of each box (and the pasted objects' masks)
            object_box_masks = gt_masks_on_grid(batch, stride, (h, w), "region_masks_padded").float()
        else:
            object_box_masks = box_masks_on_grid(torch.cat([t["boxes"] for t in batch["targets"]]), h, w, stride)
        box_masks = object_box_masks[inst["gt_global"]]
        sim = self._color_similarity(batch, stride, (h, w))
        extras = {"box_masks": box_masks, "object_box_masks": object_box_masks, "color_sim": sim}
        # mixed supervision: objects with a GT mask get method full's Dice, the others the box losses
        has_mask = None
        if "gt_masks_padded" in batch and all("has_mask" in t for t in batch["targets"]):
            extras["object_has_mask"] = torch.cat([t["has_mask"] for t in batch["targets"]]).to(logits.device)
            has_mask = extras["has_mask"] = extras["object_has_mask"][inst["gt_global"]]
        zero = logits.sum() * 0.0
        if logits.shape[0] == 0:
            return {"loss_proj": zero, "loss_pairwise": zero, **({"loss_mask": zero} if has_mask is not None else {})}, extras
        out = {"loss_proj": zero, "loss_pairwise": zero}
        # boxes only (the common case): no boolean selection, so no host sync
        box_only = None if has_mask is None else ~has_mask
        if box_only is None or box_only.any():
            lg, bm, img = logits, box_masks, inst["image"]
            if box_only is not None:
                lg, bm, img = lg[box_only], bm[box_only], img[box_only]
            out["loss_proj"] = boxinst_loss.projection_loss(lg.sigmoid()[:, 0], bm).mean()
            if not batch.get("pairwise_elsewhere", False):  # else a method (SIM) computes its own variant
                out["loss_pairwise"] = boxinst_loss.pairwise_loss(
                    lg, sim[img], bm, self.cfg.loss.pairwise_color_thresh,
                    self.cfg.loss.pairwise_size, self.cfg.loss.pairwise_dilation,
                )
        if has_mask is not None:
            out["loss_mask"] = zero
            if has_mask.any():
                gt = gt_masks_on_grid(batch, stride, (h, w))[inst["gt_global"][has_mask]].float()
                out["loss_mask"] = boxinst_loss.dice_loss(logits[has_mask].sigmoid()[:, 0], gt).mean()
        return out, extras

    def _color_similarity(self, batch: dict, stride: int, hw: tuple[int, int]) -> torch.Tensor:
        """LAB colour similarity of each image at mask resolution, with padding and the bottom rows removed."""
        images = batch["images"].float()
        pooled = F.avg_pool2d(images, kernel_size=stride, stride=stride)[:, :, : hw[0], : hw[1]]
        lab = rgb_to_lab(pooled)
        valid = torch.zeros(images.shape[0], 1, images.shape[2], images.shape[3], device=images.device)
        removed = self.cfg.loss.bottom_pixels_removed
        for i, ((ih, iw), (oh, _ow)) in enumerate(zip(batch["image_sizes"], batch["orig_sizes"])):
            cut = int(removed * float(ih) / float(oh)) if removed > 0 else 0
            valid[i, :, : ih - cut, :iw] = 1.0
        valid = valid[:, :, stride // 2 :: stride, stride // 2 :: stride][:, :, : hw[0], : hw[1]]
        return color_similarity(lab, valid, self.cfg.loss.pairwise_size, self.cfg.loss.pairwise_dilation)

    # ------------------------------------------------------------------ inference
    def inference_modules(self) -> tuple[nn.Module, nn.Module]:
        """The backbone and mask branch that inference runs: in eval mode, copies with every BatchNorm
        folded into its convolution (the same outputs within float rounding, two passes over each
        feature map fewer per norm), rebuilt whenever a weight changed; in training mode the modules
        themselves (their BatchNorms use batch statistics)."""
        if self.training:
            return self.backbone, self.mask_branch
        cache = self.__dict__.setdefault("_folded", FoldedCache())  # not a submodule: not in state_dict
        backbone, mask_branch = cache.get(self.backbone, self.mask_branch)
        return backbone, mask_branch

    def inference_autocast(self, device: torch.device):
        """bf16 autocast for inference with ``model.infer_bf16`` (CPUs with AVX-512 bf16 or AMX, and
        GPUs); post-processing runs in float32 either way."""
        if self.cfg.model.infer_bf16 and device.type in ("cpu", "cuda"):
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def inference(self, batch: dict, rle: bool = False) -> list[dict]:
        """Detections per image: boxes (original size), scores, labels and ``masks`` [N, oh, ow] bool; with
        ``rle`` the masks come as ``rles`` (COCO compressed RLE), pasted in chunks and encoded one at a
        time so memory stays bounded on huge images.

        The controller's parameters are computed at the kept detections only, and the mask branch
        runs only when some image has a detection."""
        m = self.cfg.model
        images = batch["images"]
        backbone, mask_branch = self.inference_modules()
        autocast = self.inference_autocast(images.device)
        with autocast:
            x = ((images.float() - self.pixel_mean) / self.pixel_std).contiguous(memory_format=torch.channels_last)
            feats = backbone(x)
            head = self.head.forward_dense(feats)
        locations, levels = self._locations(feats)
        level_sizes = [t.shape[-2] * t.shape[-1] for t in feats]
        reg = self._flatten(head["reg"]).float()
        cls = self._flatten(head["cls"]).float().sigmoid()
        ctr = self._flatten(head["ctr"])[..., 0].float().sigmoid()
        kept = []
        for i, (ih, iw) in enumerate(batch["image_sizes"]):
            scores = cls[i] * ctr[i][:, None]  # threshold with centerness, as CondInst
            cand_loc, cand_cls, cand_score = [], [], []
            start = 0
            for n in level_sizes:
                s = scores[start : start + n]
                keep = torch.nonzero(s > m.score_thresh)
                if keep.shape[0] > m.pre_nms_topk:
                    top = s[keep[:, 0], keep[:, 1]].topk(m.pre_nms_topk).indices
                    keep = keep[top]
                cand_loc.append(keep[:, 0] + start)
                cand_cls.append(keep[:, 1])
                cand_score.append(s[keep[:, 0], keep[:, 1]])
                start += n
            loc_idx = torch.cat(cand_loc)
            labels = torch.cat(cand_cls)
            sc = torch.cat(cand_score).sqrt()
            boxes = ltrb_to_boxes(locations[loc_idx], reg[i, loc_idx])
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, iw)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, ih)
            keep = batched_nms(boxes, sc, labels, m.nms_thresh)[: m.detections_per_image]
            kept.append((loc_idx[keep], labels[keep], sc[keep], boxes[keep]))
        # controller parameters of the whole batch's detections at once; the mask head image by image
        # (its input, [N, D + 2, H/8, W/8], grows with the detections)
        loc_all = torch.cat([k[0] for k in kept])
        image_all = torch.cat([torch.full_like(k[0], i) for i, k in enumerate(kept)])
        if loc_all.numel():
            with autocast:
                mask_feats = mask_branch(feats[:3])
                params = self._params_at(head["box_feats"], levels[loc_all], image_all, loc_all, level_sizes)
        results = []
        first = 0
        for i, ((ih, iw), (oh, ow)) in enumerate(zip(batch["image_sizes"], batch["orig_sizes"])):
            loc_idx, labels, sc, boxes = kept[i]
            n = len(loc_idx)
            logits = boxes.new_zeros(0, 1, 1, 1)
            if n:
                with autocast:
                    logits = self.mask_head(mask_feats, self.strides[0], params[first : first + n], image_all[first : first + n],
                                            locations[loc_idx], self.level_soi[levels[loc_idx]], m.mask_out_stride).float()
            first += n
            scale = torch.tensor([ow / iw, oh / ih, ow / iw, oh / ih], device=boxes.device)
            det = {"boxes": boxes * scale, "scores": sc, "labels": labels}
            if rle:
                # pasted in chunks of about 2^24 output pixels: fast on small images, bounded on huge ones
                step = max(1, (1 << 24) // max(oh * ow, 1))
                det["rles"] = [encode_rle(mk) for j in range(0, logits.shape[0], step)
                               for mk in paste_masks(logits[j : j + step], m.mask_out_stride, (ih, iw), (oh, ow), m.mask_thresh)]
            else:
                det["masks"] = paste_masks(logits, m.mask_out_stride, (ih, iw), (oh, ow), m.mask_thresh)
            results.append(det)
        return results

    def _params_at(self, box_feats: list[torch.Tensor], level: torch.Tensor, image_idx: torch.Tensor,
                   loc_idx: torch.Tensor, level_sizes: list[int]) -> torch.Tensor:
        """Controller parameters [N, P] of the instances at flat locations ``loc_idx`` (of FPN ``level``).
        Every level gathers a neighbourhood for every instance (its index clamped into the level) and the
        instance keeps its own level's: no boolean selection, so no host sync in a training step."""
        patches = None
        start = 0
        for lvl, (feat, n) in enumerate(zip(box_feats, level_sizes)):
            w = feat.shape[-1]
            idx = (loc_idx - start).clamp(0, n - 1)
            p = self.head.patches_at(feat, image_idx, idx // w, idx % w)
            patches = p if patches is None else torch.where((level == lvl)[:, None], p, patches)
            start += n
        return self.head.controller_on(patches)


def host_to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A long tensor of host-side ``values`` on ``device``, copied asynchronously (a plain
    ``torch.tensor(values, device=cuda)`` waits for the device's queued work)."""
    t = torch.tensor(values, dtype=torch.long)
    return t.to(device, non_blocking=True) if device.type == "cuda" else t


def encode_rle(mask: torch.Tensor) -> dict:
    """A boolean [h, w] mask as COCO compressed RLE with a str ``counts`` (JSON-ready)."""
    from pycocotools import mask as mask_util

    r = mask_util.encode(np.asfortranarray(mask.cpu().numpy().astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


def box_cells(boxes: torch.Tensor, h: int, w: int, stride: int = 1) -> torch.Tensor:
    """[N, h, w] bool: the cells of a stride-``stride`` grid (centres at ``j*stride + stride/2``, pixel
    centres for stride 1) inside each xyxy box."""
    xs = torch.arange(w, device=boxes.device, dtype=torch.float32) * stride + stride // 2 + 0.5
    ys = torch.arange(h, device=boxes.device, dtype=torch.float32) * stride + stride // 2 + 0.5
    in_x = (xs[None] > boxes[:, 0:1]) & (xs[None] < boxes[:, 2:3])
    in_y = (ys[None] > boxes[:, 1:2]) & (ys[None] < boxes[:, 3:4])
    return in_y[:, :, None] & in_x[:, None, :]


def box_masks_on_grid(boxes: torch.Tensor, h: int, w: int, stride: int) -> torch.Tensor:
    """[N, h, w] float masks of the mask-grid cells inside each xyxy box."""
    return box_cells(boxes, h, w, stride).float()


def gt_masks_on_grid(batch: dict, stride: int, hw: tuple[int, int], key: str = "gt_masks_padded") -> torch.Tensor:
    """All per-object masks of the batch under ``key`` (per-image masks padded to the canvas,
    concatenated in target order) sampled at the mask grid's cell centres: [G, h, w]."""
    gt = torch.cat(batch[key])[:, stride // 2 :: stride, stride // 2 :: stride]
    return gt[:, : hw[0], : hw[1]]


def paste_probs(probs: torch.Tensor, stride: int, image_size: tuple[int, int], orig_size: tuple[int, int]) -> torch.Tensor:
    """Stride-``stride`` mask probabilities [N, h, w] -> [N, oh, ow] at the original image size."""
    ih, iw = image_size
    oh, ow = orig_size
    p = aligned_bilinear(probs.float()[:, None], stride)[:, :, :ih, :iw]
    if (ih, iw) != (oh, ow):
        p = F.interpolate(p, size=(oh, ow), mode="bilinear", align_corners=False)
    return p[:, 0]


def paste_masks(logits: torch.Tensor, stride: int, image_size: tuple[int, int], orig_size: tuple[int, int], thresh: float) -> torch.Tensor:
    """Stride-``stride`` mask logits -> boolean masks [N, oh, ow] at the original image size."""
    if logits.shape[0] == 0:
        return torch.zeros(0, *orig_size, dtype=torch.bool, device=logits.device)
    if tuple(image_size) == tuple(orig_size):  # no resize: threshold before the upsampling's last step
        return aligned_bilinear_above(logits.float().sigmoid(), stride, thresh, tuple(image_size))[:, 0]
    return paste_probs(logits.float().sigmoid()[:, 0], stride, image_size, orig_size) > thresh
