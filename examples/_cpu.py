"""CPU thread settings the examples share. Import it before torch: it sets OpenMP's wait policy,
which OpenMP reads once, when torch loads it."""
import os

# OpenMP's threads spin while they wait for the next parallel region. On a small machine shared with
# other jobs a spinning thread holds the core its partner needs: a training step of the needle example
# (2 threads, 2 cores, load 7) took 15.5 s with spinning threads and 1.1 s with sleeping ones. The
# examples' ops are small, so sleeping costs them nothing measurable. A value already set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def physical_cores() -> int:
    """The physical cores this process may run on (hyperthreads of one core counted once)."""
    allowed = os.sched_getaffinity(0)
    cores, cpu, core = set(), None, [None, None]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "processor":
                    cpu = int(value)
                elif key == "physical id":
                    core[0] = value.strip()
                elif key == "core id":
                    core[1] = value.strip()
                    if cpu in allowed:
                        cores.add(tuple(core))
    except (OSError, ValueError):
        pass
    return len(cores) or len(allowed)


def set_threads(device: str) -> None:
    """On the CPU, torch's threads capped at the physical cores (more would share cores and wait on
    each other); says how many there are and how busy the machine is, which decides the run time."""
    import torch

    if not str(device).startswith("cpu"):
        return
    torch.set_num_threads(max(1, min(torch.get_num_threads(), physical_cores())))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"CPU: {torch.get_num_threads()} torch threads on {physical_cores()} physical cores, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load average {load:.1f}", flush=True)
