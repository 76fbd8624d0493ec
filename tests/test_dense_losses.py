"""Dense-prediction losses (kdcache/losses/dense.py) against slow float64 transcriptions of their papers' formulas,
written here with loops over samples, channels and positions: values, gradients (torch.autograd.grad of both),
the resize rule, zero at the teacher, precision and the refusals."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdcache.errors import KdcacheError
from kdcache.losses import cwd, pixel_kd


def _kl_of_softmaxes(teacher_scores, student_scores, temperature):
    """KL(softmax(t/T) ‖ softmax(s/T)) over one list of 0-d tensors, each softmax spelled out."""
    def softmax(scores):
        top = max(float(x.detach()) for x in scores)  # a constant shift: the softmax is the same
        exps = [torch.exp((x - top) / temperature) for x in scores]
        total = sum(exps)
        return [e / total for e in exps]

    p_t, p_s = softmax(teacher_scores), softmax(student_scores)
    return sum(a * (torch.log(a) - torch.log(b)) for a, b in zip(p_t, p_s))


def pixel_kd_reference(student, teacher, temperature):
    """Liu et al. 2019's pixel term at T: T² · KL over the classes at each pixel, the mean over pixels and samples."""
    batch, classes, height, width = teacher.shape
    total = 0
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                total = total + _kl_of_softmaxes([teacher[b, c, i, j] for c in range(classes)],
                                                 [student[b, c, i, j] for c in range(classes)], temperature)
    return temperature**2 * total / (batch * height * width)


def cwd_reference(student, teacher, temperature):
    """Shu et al. 2021: T² · KL over the positions of each channel, the mean over samples and channels."""
    batch, channels, height, width = teacher.shape
    positions = [(i, j) for i in range(height) for j in range(width)]
    total = 0
    for b in range(batch):
        for c in range(channels):
            total = total + _kl_of_softmaxes([teacher[b, c, i, j] for i, j in positions],
                                             [student[b, c, i, j] for i, j in positions], temperature)
    return temperature**2 * total / (batch * channels)


def _resized(student, teacher):
    return F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)


# each case: (kdcache's loss, the reference, the student's shape); the teacher is [2, 3, 4, 3] throughout
CASES = {
    "pixel_kd (default T 1)": (lambda s, t: pixel_kd(s, t), lambda s, t: pixel_kd_reference(s, t, 1.0), (2, 3, 4, 3)),
    "pixel_kd (T 4)": (lambda s, t: pixel_kd(s, t, temperature=4.0),
                       lambda s, t: pixel_kd_reference(s, t, 4.0), (2, 3, 4, 3)),
    "cwd (default T 4)": (lambda s, t: cwd(s, t), lambda s, t: cwd_reference(s, t, 4.0), (2, 3, 4, 3)),
    "cwd (T 1)": (lambda s, t: cwd(s, t, temperature=1.0), lambda s, t: cwd_reference(s, t, 1.0), (2, 3, 4, 3)),
    "pixel_kd (student 2x2)": (lambda s, t: pixel_kd(s, t),
                               lambda s, t: pixel_kd_reference(_resized(s, t), t, 1.0), (2, 3, 2, 2)),
    "cwd (student 2x2)": (lambda s, t: cwd(s, t), lambda s, t: cwd_reference(_resized(s, t), t, 4.0), (2, 3, 2, 2)),
}


def _draw(seed, student_shape):
    generator = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(*student_shape, generator=generator, dtype=torch.float64)
    return student, 3 * torch.randn(2, 3, 4, 3, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(CASES))
def test_the_value_is_the_papers_formula(name, seed):
    loss, reference, shape = CASES[name]
    student, teacher = _draw(seed, shape)
    value = loss(student, teacher)
    assert value.dtype == torch.float64 and value.shape == ()
    assert float(value) == pytest.approx(float(reference(student, teacher)), rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("name", list(CASES))
def test_the_gradient_is_the_formulas(name):
    loss, reference, shape = CASES[name]
    student, teacher = _draw(2, shape)
    student.requires_grad_()
    (gradient,) = torch.autograd.grad(loss(student, teacher), student)
    (expected,) = torch.autograd.grad(reference(student, teacher), student)
    assert gradient.abs().sum() > 0
    torch.testing.assert_close(gradient, expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("loss", [pixel_kd, cwd])
def test_a_smaller_student_is_resized_to_the_teacher_bilinearly_without_aligned_corners(loss):
    student, teacher = _draw(3, (2, 3, 2, 2))  # half the teacher's 4 x 3 in height
    same_size = F.interpolate(student, size=(4, 3), mode="bilinear", align_corners=False)
    assert float(loss(student, teacher)) == pytest.approx(float(loss(same_size, teacher)), rel=1e-14)
    corners_aligned = F.interpolate(student, size=(4, 3), mode="bilinear", align_corners=True)
    assert float(loss(student, teacher)) != pytest.approx(float(loss(corners_aligned, teacher)), rel=1e-6)


@pytest.mark.parametrize("loss", [pixel_kd, cwd])
def test_the_loss_is_zero_at_the_teacher_and_positive_elsewhere(loss):
    student, teacher = _draw(4, (2, 3, 4, 3))
    assert float(loss(teacher.clone(), teacher)) == 0
    assert float(loss(student, teacher)) > 0


def test_the_axes_differ_pixel_kd_over_classes_cwd_over_positions():
    """A map that is the same at every position has equal class distributions everywhere, and a uniform
    distribution over the positions of each channel: CWD is 0, pixel-wise KD is not."""
    teacher = torch.randn(1, 3, 1, 1, dtype=torch.float64).expand(1, 3, 2, 2)
    student = torch.randn(1, 3, 1, 1, dtype=torch.float64).expand(1, 3, 2, 2)
    assert float(cwd(student, teacher)) == pytest.approx(0, abs=1e-15)
    assert float(pixel_kd(student, teacher)) == pytest.approx(float(pixel_kd(student[..., :1, :1],
                                                                              teacher[..., :1, :1])), rel=1e-12)
    assert float(pixel_kd(student, teacher)) > 0


@pytest.mark.parametrize("loss", [pixel_kd, cwd])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(loss, dtype):
    student, teacher = (x.to(dtype) for x in _draw(5, (2, 3, 4, 3)))
    value = loss(student, teacher)
    assert value.dtype == torch.float32
    assert float(value) == float(loss(student.float(), teacher.float()))
    assert math.isfinite(float(loss(student * 1e3, teacher)))  # logits of ±1e4 in fp16: no overflow


@pytest.mark.parametrize("loss", [pixel_kd, cwd])
@pytest.mark.parametrize("student_shape, teacher_shape, message", [
    ((2, 3, 4), (2, 3, 4, 3), r"needs student and teacher maps \[B, C, H, W\], found \(2, 3, 4\) and \(2, 3, 4, 3\)"),
    ((2, 3), (2, 3), r"needs student and teacher maps \[B, C, H, W\], found \(2, 3\) and \(2, 3\)"),
    ((2, 5, 4, 3), (2, 3, 4, 3), r"\(2, 5, 4, 3\) and the teacher's \(2, 3, 4, 3\) differ in batch or channels "
                                 r"\(expected the same \[B, C\]\); give the student's head the teacher's 3 channels"),
    ((1, 3, 4, 3), (2, 3, 4, 3), r"differ in batch or channels"),
])
def test_maps_of_other_ranks_batches_or_channels_are_refused_in_one_line(loss, student_shape, teacher_shape,
                                                                         message):
    with pytest.raises(KdcacheError, match=rf"^{loss.__name__}\(\): .*{message}") as refusal:
        loss(torch.zeros(student_shape), torch.zeros(teacher_shape))
    assert "\n" not in str(refusal.value)


@pytest.mark.parametrize("call, message", [
    (lambda: pixel_kd(torch.zeros(2, 3, 4, 3), torch.zeros(2, 3, 4, 3), temperature=0),
     r"^pixel_kd\(\): needs a temperature > 0, found 0$"),
    (lambda: cwd(torch.zeros(2, 3, 4, 3), torch.zeros(2, 3, 4, 3), temperature=-1.0),
     r"^cwd\(\): needs a temperature > 0, found -1.0$"),
    (lambda: pixel_kd(torch.zeros(2, 1, 4, 3), torch.zeros(2, 1, 4, 3)),
     r"^pixel_kd\(\): needs at least 2 classes \(C\) to soften, found 1$"),
    (lambda: cwd(torch.zeros(2, 3, 4, 3), torch.zeros(2, 3, 1, 1)),
     r"^cwd\(\): needs at least 2 positions \(H·W\) to soften, found 1$"),
])
def test_a_softmax_that_cannot_soften_is_refused(call, message):
    with pytest.raises(KdcacheError, match=message):
        call()
