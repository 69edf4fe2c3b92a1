"""Benchmarks that print a table and write JSON, never timed unit tests:

    layer    one routed layer: moekit vs transformers' Mixtral block vs megablocks vs a dense SwiGLU (`bench layer`)
    gemm     the grouped-GEMM kernels vs torch's grouped_mm vs a dense matmul of equal FLOPs (`bench gemm`)
    train    training steps of one MoE model: moekit vs transformers' Mixtral (`bench train`)
    timing   what they share: timing on CPU or with CUDA events, medians, the environment and commit
    options  what each is asked to measure

It may import every room below it (`moekit.kernels`, `moekit.llama`, `moekit.moe`, `moekit.moe.accounting`). Nothing is exported: import the module.
"""
