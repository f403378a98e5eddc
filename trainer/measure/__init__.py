"""The benchmark's measuring machinery (`python -m launch.bench`, `python -m launch.gpu_check`): memory probes
(`memory`), FLOP counting and device peaks (`flops`), the plain-torch engine for hosts without DeepSpeed (`plain`),
one timed configuration and its JSON record (`bench`), and the reference table with the ours-vs-reference report
(`reference`)."""
