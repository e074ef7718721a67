"""A data source that sleeps a little per example, so a test can kill a run mid-way (the kill-and-resume tests'
subprocess scripts import it with the tests folder on sys.path)."""

import time


class SlowSource:
    def __init__(self, src, delay: float):
        self.src, self.delay = src, delay
        self.num_classes, self.class_names = src.num_classes, src.class_names

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int):
        time.sleep(self.delay)
        return self.src[i]
