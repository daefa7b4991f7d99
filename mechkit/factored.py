"""FactoredMatrix: a matrix kept as the product ``A @ B`` of a tall and a wide factor.

The QK circuit of a head is ``W_Q @ W_K.T`` ([d_model, d_model], rank d_head) and its OV circuit
``W_V @ W_O``. Keeping the factors makes products, norms, SVDs and eigenvalues cost
O(d_model * d_head^2) instead of O(d_model^3). The class follows TransformerLens's
``FactoredMatrix`` (same attributes, same numbers on the same factors).

Shapes: ``A`` [..., ldim, mdim], ``B`` [..., mdim, rdim]; leading dimensions broadcast
(e.g. [n_layers, n_heads]). Indexing applies to the leading dimensions first; indexing the
last two dimensions as well selects rows of ``A`` / columns of ``B``.
"""

from __future__ import annotations

from functools import cached_property

import torch


class FactoredMatrix:
    """The matrix ``A @ B``, never formed unless ``.AB`` is asked for."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"FactoredMatrix: A's last dim must equal B's second-to-last; got A {tuple(A.shape)}, "
                             f"B {tuple(B.shape)}")
        try:
            lead = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError:
            raise ValueError(f"FactoredMatrix: leading dims of A {tuple(A.shape)} and B {tuple(B.shape)} do not "
                             "broadcast") from None
        self.ldim, self.mdim, self.rdim = A.shape[-2], A.shape[-1], B.shape[-1]
        self.shape = torch.Size((*lead, self.ldim, self.rdim))
        self.A = A.broadcast_to((*lead, self.ldim, self.mdim))
        self.B = B.broadcast_to((*lead, self.mdim, self.rdim))
        self.has_leading_dims = len(lead) > 0

    # products -----------------------------------------------------------------
    def __matmul__(self, other):
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        if other.ndim < 2:  # a vector: collapse
            return (self.A @ (self.B @ other.unsqueeze(-1))).squeeze(-1)
        if other.shape[-2] != self.rdim:
            raise ValueError(f"FactoredMatrix @ tensor: inner dims differ ({tuple(self.shape)} @ {tuple(other.shape)})")
        if self.rdim > self.mdim:
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other):
        if isinstance(other, FactoredMatrix):
            return other.A @ (other.B @ self)
        if other.shape[-1] != self.ldim:
            raise ValueError(f"tensor @ FactoredMatrix: inner dims differ ({tuple(other.shape)} @ {tuple(self.shape)})")
        if other.ndim < 2:
            return ((other.unsqueeze(-2) @ self.A) @ self.B).squeeze(-2)
        if self.ldim > self.mdim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar) -> FactoredMatrix:
        if isinstance(scalar, torch.Tensor) and scalar.numel() != 1:
            raise ValueError(f"FactoredMatrix * x needs a scalar; got shape {tuple(scalar.shape)} (use @ for products)")
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    @property
    def AB(self) -> torch.Tensor:
        """The full matrix [..., ldim, rdim]."""
        return self.A @ self.B

    @property
    def BA(self) -> torch.Tensor:
        """The reverse product [..., mdim, mdim]; needs ldim == rdim."""
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs a square matrix; shape is {tuple(self.shape)}")
        return self.B @ self.A

    @property
    def T(self) -> FactoredMatrix:
        return FactoredMatrix(self.B.transpose(-2, -1), self.A.transpose(-2, -1))

    @property
    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.A, self.B

    @property
    def ndim(self) -> int:
        return len(self.shape)

    # spectra --------------------------------------------------------------------
    @cached_property
    def _svd(self):
        ua, sa, vha = torch.linalg.svd(self.A, full_matrices=False)
        ub, sb, vhb = torch.linalg.svd(self.B, full_matrices=False)
        middle = sa[..., :, None] * vha @ ub * sb[..., None, :]
        um, sm, vhm = torch.linalg.svd(middle, full_matrices=False)
        return ua @ um, sm, vhb.transpose(-2, -1) @ vhm.transpose(-2, -1)

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U [..., ldim, mdim], S [..., mdim], V [..., rdim, mdim]) with ``U @ diag(S) @ V.T == AB``."""
        return self._svd

    @property
    def U(self) -> torch.Tensor:
        return self._svd[0]

    @property
    def S(self) -> torch.Tensor:
        return self._svd[1]

    @property
    def V(self) -> torch.Tensor:
        return self._svd[2]

    @property
    def eigenvalues(self) -> torch.Tensor:
        """Eigenvalues of ``AB`` [..., mdim] (complex), from ``BA`` (same nonzero spectrum)."""
        ba = self.BA
        if ba.dtype in (torch.float16, torch.bfloat16):
            ba = ba.float()
        return torch.linalg.eig(ba).eigenvalues

    def norm(self) -> torch.Tensor:
        """Frobenius norm [...]."""
        return self.S.pow(2).sum(-1).sqrt()

    def collapse_l(self) -> torch.Tensor:
        """``diag(S) @ V.T`` [..., mdim, rdim]: the left orthogonal factor removed."""
        return self.S[..., :, None] * self.V.transpose(-2, -1)

    def collapse_r(self) -> torch.Tensor:
        """``U @ diag(S)`` [..., ldim, mdim]."""
        return self.U * self.S[..., None, :]

    def make_even(self) -> FactoredMatrix:
        """The same matrix as ``(U sqrt(S)) @ (sqrt(S) V.T)``."""
        root = self.S.sqrt()
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * self.V.transpose(-2, -1))

    def get_corner(self, k: int = 3) -> torch.Tensor:
        """The top-left k x k corner of ``AB`` (for a first look), leading dims cut to k as well."""
        full = self.A[..., :k, :] @ self.B[..., :, :k]
        return full[tuple(slice(k) for _ in range(full.ndim))]

    # shape ----------------------------------------------------------------------
    def unsqueeze(self, k: int) -> FactoredMatrix:
        return FactoredMatrix(self.A.unsqueeze(k), self.B.unsqueeze(k))

    def __getitem__(self, idx) -> FactoredMatrix:
        idx = idx if isinstance(idx, tuple) else (idx,)
        n = len([i for i in idx if i is not None])
        lead = self.ndim - 2
        if n <= lead:
            return FactoredMatrix(self.A[idx], self.B[idx])

        def keep(i):  # an int on a matrix dim keeps the dim (a row stays a 1-row matrix)
            return slice(i, i + 1 if i != -1 else None) if isinstance(i, int) else i

        if n == lead + 1:
            return FactoredMatrix(self.A[(*idx[:-1], keep(idx[-1]))], self.B[idx[:-1]])
        if n == lead + 2:
            return FactoredMatrix(self.A[(*idx[:-2], keep(idx[-2]))], self.B[(*idx[:-2], slice(None), keep(idx[-1]))])
        raise IndexError(f"index {idx} is too long for a FactoredMatrix of shape {tuple(self.shape)}")

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={tuple(self.shape)}, hidden_dim={self.mdim})"


def composition_scores(left: FactoredMatrix, right: FactoredMatrix, broadcast_dims: bool = True) -> torch.Tensor:
    """``||L R||_F / (||L||_F ||R||_F)`` (Elhage et al. 2021), as TransformerLens computes it.

    With ``broadcast_dims`` the leading dims of ``left`` and ``right`` are crossed: left [*a, d, d]
    and right [*b, d, d] give [*a, *b].
    """
    if broadcast_dims:
        nl, nr = left.ndim - 2, right.ndim - 2
        for i in range(nl):
            right = right.unsqueeze(i)
        for i in range(nr):
            left = left.unsqueeze(i + nl)
    if left.rdim != right.ldim:
        raise ValueError(f"composition_scores: left.rdim {left.rdim} != right.ldim {right.ldim}")
    r, l_ = right.collapse_r(), left.collapse_l()
    return (l_ @ r).norm(dim=(-2, -1)) / r.norm(dim=(-2, -1)) / l_.norm(dim=(-2, -1))
