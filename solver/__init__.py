"""Pure tensor math for armor-export: 2:4 masks and packing, block-diagonal products, the
normaliser, calibration statistics, the proxy objective, the baselines and the ARMOR solver.

Imports torch only. Nothing here touches files, modules, hooks or devices beyond the tensors
it is given.
"""
