"""Input and output: loading data sets, decoding single items, perturbations."""
