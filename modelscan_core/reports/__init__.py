"""How results are shown: one module per format, each a `render(report, options) -> str`."""
