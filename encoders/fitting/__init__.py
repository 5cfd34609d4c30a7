"""Artifacts fitted per identity by optimisation against a frozen diffusion model (Celeb
Basis, LiDB): the shared core, each method, their jobs, and exports for other tools."""
