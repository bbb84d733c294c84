"""Trainer tasks: each bundles a dataset, parameter init and a loss for `mmjax.train.train`."""
