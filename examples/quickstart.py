"""The three-argument call: distil a teacher into a student on scikit-learn's digits.

    python examples/quickstart.py        # about 1 minute on 2 CPU cores

Last run printed (52 s): teacher 96.1% top-1 on held-out digits; student 88.7%, agreement 90.1%.
"""

import jax

import patient
from patient import distill
from patient.data import digits
from patient.models import create

data = digits("train")
# A teacher: a CIFAR ResNet-20 trained briefly with patient.train (any .eqx file or (model, state) pair works).
teacher = patient.train(create("cifar_resnet20", num_classes=10, key=jax.random.key(0), resolution=16), data,
                        steps=200, mode="same/rc", progress=False)
teacher = (teacher.student, teacher.state)
student = create("cifar_resnet20", num_classes=10, key=jax.random.key(1), resolution=16, depths=(1, 1, 1))

result = distill(teacher, student, data)  # defaults: mode "fm", KL at T=1, Adam with warm-up + cosine, 20 epochs

m = patient.evaluate((result.student, result.state), digits("test"), teacher=teacher)
print(f"teacher {m['teacher_top1']:.1f}% top-1 on held-out digits; student {m['top1']:.1f}%, "
      f"agreement {m['agreement']:.1f}%")
