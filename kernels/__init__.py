"""TileLang kernel factories for NSA, one module per family (selected, ...).

Each factory takes compile-time constants and returns a cached compiled kernel (`tilelang.jit`);
lengths (B, T, varlen totals) are dynamic. Host-side validation and autograd live in nsa_module.
"""
