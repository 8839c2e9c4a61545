"""Training curves of model lineages: the data (curves.py, torch-free) and its pictures
(render.py: matplotlib for PNG/SVG, plotext for a terminal), each imported only by
`mstore plot`."""
