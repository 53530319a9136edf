"""Executes ring plans: transports, ring drivers, the autograd function, local kernel back-ends."""
