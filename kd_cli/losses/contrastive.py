"""Representation distillation with a contrastive objective and a memory bank of negatives."""

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.errors import KdError
from kd_cli.losses.weighted import WeightedTerm, flat, flat_size

log = logging.getLogger(__name__)


def nce_loss(scores: torch.Tensor, num_data: int) -> torch.Tensor:
    """CRD's NCE objective. `scores` (B, 1 + K): column 0 the positive, then K negatives, each an
    unnormalised probability; noise is uniform over the num_data samples, K noise draws per positive."""
    k = scores.shape[1] - 1
    noise = k / num_data
    eps = 1e-7
    positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
    negative = torch.log(noise / (scores[:, 1:] + noise + eps))
    return -(positive.sum() + negative.sum()) / len(scores)


class ContrastiveRD(WeightedTerm, name="crd"):
    """CRD (Tian et al., 2020) on the embeddings.

    Linear heads project both embeddings to `feat_dim` and L2-normalise them. Two memory banks hold
    one vector per training image: the student's and the teacher's, each entry refreshed with
    momentum from its image's latest embedding. For each image the teacher's embedding is scored
    against the student bank at its own index (the positive) and at `nce_k` other random indices
    (negatives), and the student's embedding likewise against the teacher bank; scores are
    exp(cos / nce_t) divided by a constant fixed on the first batch; the term is the sum of the two
    NCE losses. The banks take 2 * num_train * feat_dim floats: they grow with the dataset.
    """

    layer_kind = "embedding"
    max_layers = 1

    def __init__(self, alpha, T, weight=0.8, feat_dim=128, nce_k=16384, nce_t=0.07, momentum=0.5, **options):
        super().__init__(alpha, T, weight, **options)
        self.feat_dim, self.nce_k = self.whole_option("feat_dim", feat_dim, 1), self.whole_option("nce_k", nce_k, 1)
        self.nce_t, self.momentum = float(nce_t), float(momentum)
        if self.nce_t <= 0:
            raise ValueError(f"loss.nce_t must be > 0 (the temperature of the scores), got {nce_t}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"loss.momentum must be in [0, 1) (the memory banks' share of the old entry), got {momentum}")

    def setup(self, student_shapes, teacher_shapes, num_train):
        if len(student_shapes) != 1:
            raise KdError(f"loss=crd contrasts one layer pair (an embedding of each model), but loss.student_layers / "
                          f"loss.teacher_layers give {len(student_shapes)}; give one layer each")
        if num_train < 2:
            raise KdError(f"loss=crd draws negatives from the other training images; it needs at least 2, got {num_train}")
        self.num_data = num_train
        self.embed_student = nn.Linear(flat_size(student_shapes[0]), self.feat_dim)
        self.embed_teacher = nn.Linear(flat_size(teacher_shapes[0]), self.feat_dim)
        bound = 1 / math.sqrt(self.feat_dim / 3)
        self.register_buffer("memory_student", torch.rand(num_train, self.feat_dim) * 2 * bound - bound)
        self.register_buffer("memory_teacher", torch.rand(num_train, self.feat_dim) * 2 * bound - bound)
        # Normalisers of the two score sets, fixed from the first batch (negative: not set yet).
        self.register_buffer("normalizers", torch.full((2,), -1.0))
        self._normalized = False
        mb = 2 * num_train * self.feat_dim * 4 / 2**20
        log.info("crd: memory banks of 2 x %d x %d floats (%.1f MB); they grow with the training set, and so does "
                 "each step's cost: the batch is scored against the whole bank, of which it keeps %d negatives per "
                 "image drawn at random (loss.nce_k)", num_train, self.feat_dim, mb, self.nce_k)
        if self.nce_k >= num_train - 1:
            log.warning("crd: loss.nce_k=%d is not below the %d other training images, so the same images are drawn "
                        "as negatives again and again", self.nce_k, num_train - 1)

    def negatives(self, indices: torch.Tensor) -> torch.Tensor:
        """nce_k random indices per sample, uniform over the other training images."""
        draws = torch.randint(0, self.num_data - 1, (len(indices), self.nce_k), device=indices.device)
        return draws + (draws >= indices[:, None]).long()

    def term(self, student, teacher, targets, indices=None):
        if indices is None:
            raise KdError("loss=crd needs the batch's training-set indices (its memory bank is per image)")
        (s, t), = self.feature_pairs(student, teacher)
        v_s = F.normalize(self.embed_student(flat(s)), dim=1)
        v_t = F.normalize(self.embed_teacher(flat(t)), dim=1)
        candidates = torch.cat([indices[:, None], self.negatives(indices)], dim=1)
        # Scoring against the whole bank, then picking columns, costs B x N x d: for kd's datasets far
        # less than gathering B x (1 + K) rows of d (1 GB per bank at K=16384, B=128). In the banks'
        # precision (fp32) even under bf16 autocast: exp(cos / 0.07) spans six orders of magnitude.
        dtype = self.memory_student.dtype
        with torch.autocast(v_s.device.type, enabled=False):
            scores_s = torch.exp(v_s.to(dtype) @ self.memory_teacher.t() / self.nce_t).gather(1, candidates)
            scores_t = torch.exp(v_t.to(dtype) @ self.memory_student.t() / self.nce_t).gather(1, candidates)
        if not self._normalized:
            # Read once per process (one host sync), not every step; a resumed run finds them set.
            self._normalized = bool(self.normalizers[0] >= 0)
        if not self._normalized:
            with torch.no_grad():
                self.normalizers.copy_(torch.stack([scores_s.mean(), scores_t.mean()]) * self.num_data)
            self._normalized = True
        loss = (nce_loss(scores_s / self.normalizers[0], self.num_data)
                + nce_loss(scores_t / self.normalizers[1], self.num_data))
        if self.training:
            self._remember(indices, v_s.detach().to(dtype), v_t.detach().to(dtype))
        return loss

    def _remember(self, indices, v_s, v_t):
        # Out of place: the banks used above are saved for the backward pass, which runs after this.
        for name, v in (("memory_student", v_s), ("memory_teacher", v_t)):
            bank = getattr(self, name)
            mixed = F.normalize(bank[indices] * self.momentum + v * (1 - self.momentum), dim=1)
            setattr(self, name, bank.index_copy(0, indices, mixed))
