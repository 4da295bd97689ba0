"""The CPU wing: XLA:CPU kernels for the DARTS ops (`kernels`) and host-memory handling for
XLA:CPU's buffers (`host`). Nothing outside `models.select_kernels`, `parallel` and the entry
points' start-up imports it; on a GPU or TPU none of it runs."""
