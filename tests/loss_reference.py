"""Slow reference formulas for tests/test_losses.py, written straight from the papers.

Plain Python floats (float64), loops over samples, regions and classes; nothing shared with
kdcache.losses. Logits are nested lists: [B][C] for one logit per sample, [B][R][C] for regions.
`numeric_gradient` differentiates any reference by central differences, for the tests of gradients.
"""

import math

import torch


def softmax(row, temperature=1.0):
    top = max(row)
    exps = [math.exp((x - top) / temperature) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def kl(p, q):
    """KL(p ‖ q) = Σ_i p_i log(p_i / q_i), with 0 · log 0 = 0."""
    return sum(p_i * math.log(p_i / q_i) for p_i, q_i in zip(p, q) if p_i > 0)


def argmax(row):
    """The first index of the largest value (torch.argmax's tie rule)."""
    best = 0
    for j, x in enumerate(row):
        if x > row[best]:
            best = j
    return best


def standardize(row, eps=1e-7):
    """Sun et al. 2024: (z − mean) / (std + eps), std the unbiased one (the LS code's torch.std)."""
    n = len(row)
    mean = sum(row) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in row) / (n - 1))
    return [(x - mean) / (std + eps) for x in row]


def kd_one(s, t, temperature):
    """Hinton et al. 2015, one sample: T² · KL(softmax(t/T) ‖ softmax(s/T))."""
    return temperature**2 * kl(softmax(t, temperature), softmax(s, temperature))


def dkd_one(s, t, y, alpha, beta, temperature):
    """Zhao et al. 2022, one sample: T² · (α · KL(b_t ‖ b_s) + β · KL(p̂_t ‖ p̂_s))."""
    p_s, p_t = softmax(s, temperature), softmax(t, temperature)
    b_s = [p_s[y], sum(p for j, p in enumerate(p_s) if j != y)]
    b_t = [p_t[y], sum(p for j, p in enumerate(p_t) if j != y)]
    hat_s = softmax([x for j, x in enumerate(s) if j != y], temperature)
    hat_t = softmax([x for j, x in enumerate(t) if j != y], temperature)
    return temperature**2 * (alpha * kl(b_t, b_s) + beta * kl(hat_t, hat_s))


def kd(student, teacher, temperature, standardize_logits=False):
    losses = []
    for s, t in zip(student, teacher):
        if standardize_logits:
            s, t = standardize(s), standardize(t)
        losses.append(kd_one(s, t, temperature))
    return sum(losses) / len(losses)


def dkd(student, teacher, labels, alpha, beta, temperature, standardize_logits=False):
    losses = []
    for s, t, y in zip(student, teacher, labels):
        if standardize_logits:
            s, t = standardize(s), standardize(t)
        losses.append(dkd_one(s, t, y, alpha, beta, temperature))
    return sum(losses) / len(losses)


def sdd_weight(teacher_regions_of_sample, y, r, complementary_weight):
    """Wei et al. 2024: weight 1 if the teacher's global and local predictions are both right or both wrong."""
    global_right = argmax(teacher_regions_of_sample[0]) == y
    local_right = argmax(teacher_regions_of_sample[r]) == y
    return 1.0 if global_right == local_right else complementary_weight


def sdd(student, teacher, labels, base, complementary_weight, standardize_logits=False, **base_args):
    """Σ over samples and regions of weight · base loss, divided by R · B; base is "kd" or "dkd"."""
    total, count = 0.0, 0
    for s_regions, t_regions, y in zip(student, teacher, labels):
        for r, (s, t) in enumerate(zip(s_regions, t_regions)):
            weight = sdd_weight(t_regions, y, r, complementary_weight)
            if standardize_logits:
                s, t = standardize(s), standardize(t)
            if base == "kd":
                loss = kd_one(s, t, base_args["temperature"])
            else:
                loss = dkd_one(s, t, y, base_args["alpha"], base_args["beta"], base_args["temperature"])
            total += weight * loss
            count += 1
    return total / count


def swap(row, y):
    """Limantoro et al. 2025: exchange the label's logit with the largest one when they differ."""
    row = list(row)
    top = argmax(row)
    if top != y:
        row[y], row[top] = row[top], row[y]
    return row


def sld(student, teacher, labels, temperatures, epoch, switch_epoch):
    """Σ_T KD_T(s, swap(t)) + [epoch > switch] Σ_T KD_T(s, swap(s)), each KD a mean over samples."""
    total = 0.0
    for temperature in temperatures:
        total += kd(student, [swap(t, y) for t, y in zip(teacher, labels)], temperature)
        if epoch > switch_epoch:
            total += kd(student, [swap(s, y) for s, y in zip(student, labels)], temperature)
    return total


# --- feature and relation losses: vectors are lists of floats, maps [C][H][W] lists per sample ------------------


def l2_normalize(vector, eps=1e-12):
    """v / max(‖v‖, eps), as F.normalize."""
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / max(norm, eps) for x in vector]


def attention_map(feature, p=2):
    """Zagoruyko & Komodakis 2017, one sample [C][H][W]: Q = mean_c |F_c|^p per position, flattened, Q / ‖Q‖."""
    channels, height, width = len(feature), len(feature[0]), len(feature[0][0])
    energy = [sum(abs(feature[c][i][j]) ** p for c in range(channels)) / channels
              for i in range(height) for j in range(width)]
    return l2_normalize(energy)


def at(student_maps, teacher_maps):
    """Σ over stage pairs of mean over samples and positions of (Q_s − Q_t)²; maps [B][H*W] per stage."""
    total = 0.0
    for student, teacher in zip(student_maps, teacher_maps):
        squares = [(a - b) ** 2 for s_row, t_row in zip(student, teacher) for a, b in zip(s_row, t_row)]
        total += sum(squares) / len(squares)
    return total


def sp(student, teacher):
    """Tung & Mori 2019: G = F Fᵀ over the batch, rows L2-normalised; ‖G_s − G_t‖_F² / b²."""
    def gram(rows):
        return [l2_normalize([dot(x, y) for y in rows]) for x in rows]
    g_s, g_t = gram(student), gram(teacher)
    b = len(student)
    return sum((g_s[i][j] - g_t[i][j]) ** 2 for i in range(b) for j in range(b)) / (b * b)


def huber(x, y):
    """smooth L1 with beta 1: 0.5 d² if |d| < 1, else |d| − 0.5."""
    d = abs(x - y)
    return 0.5 * d * d if d < 1 else d - 0.5


def rkd_distances(rows, eps=1e-12):
    """Park et al. 2019: ψ_D(t_i, t_j) = ‖t_i − t_j‖ / μ, μ the mean distance over pairs i ≠ j; 0 for i = j.
    The squared distance is clamped at eps before the root, as the reference code does."""
    b = len(rows)
    d = [[0.0 if i == j else math.sqrt(max(sum((x - y) ** 2 for x, y in zip(rows[i], rows[j])), eps))
          for j in range(b)] for i in range(b)]
    mean = sum(d[i][j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
    return [[value / mean for value in row] for row in d]


def rkd_angles(rows):
    """ψ_A(t_i, t_j, t_k) = cos ∠ t_j t_i t_k = ⟨(t_j − t_i)/‖·‖, (t_k − t_i)/‖·‖⟩, every ordered triplet."""
    b = len(rows)
    sides = [[l2_normalize([y - x for x, y in zip(rows[i], rows[j])]) for j in range(b)] for i in range(b)]
    return [[[sum(u * v for u, v in zip(sides[i][j], sides[i][k])) for k in range(b)] for j in range(b)]
            for i in range(b)]


def rkd(student, teacher, distance_weight=25.0, angle_weight=50.0):
    """w_D · mean Huber(ψ_D^s, ψ_D^t) over b² pairs + w_A · mean Huber(ψ_A^s, ψ_A^t) over b³ triplets."""
    def mean_huber(a, b):
        flat_a, flat_b = _flatten(a), _flatten(b)
        return sum(huber(x, y) for x, y in zip(flat_a, flat_b)) / len(flat_a)
    return (distance_weight * mean_huber(rkd_distances(student), rkd_distances(teacher))
            + angle_weight * mean_huber(rkd_angles(student), rkd_angles(teacher)))


def _flatten(nested):
    return [x for item in nested for x in (_flatten(item) if isinstance(item, list) else [item])]


def dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def crd(student, teacher, negatives, temperature):
    """Tian et al. 2020 (InfoNCE form): mean over i of −log[e^{s_i·t_i/τ} / (e^{s_i·t_i/τ} + Σ_k e^{s_i·n_ik/τ})],
    every vector L2-normalised."""
    losses = []
    for s, t, others in zip(student, teacher, negatives):
        s, t = l2_normalize(s), l2_normalize(t)
        positive = math.exp(dot(s, t) / temperature)
        against = sum(math.exp(dot(s, l2_normalize(n)) / temperature) for n in others)
        losses.append(-math.log(positive / (positive + against)))
    return sum(losses) / len(losses)


def embedding_cosine(student, teacher):
    """CLIP distillation's embedding term: mean over i of 1 − s_i·t_i / (‖s_i‖ ‖t_i‖)."""
    return sum(1 - dot(s, t) / math.sqrt(dot(s, s) * dot(t, t)) for s, t in zip(student, teacher)) / len(student)


def irg_edges(rows):
    """Liu et al. 2019 (as the reference code): ‖x_i − x_j‖², 0 for i = j, over the largest entry."""
    b = len(rows)
    d = [[0.0 if i == j else max(sum((x - y) ** 2 for x, y in zip(rows[i], rows[j])), 1e-12) for j in range(b)]
         for i in range(b)]
    top = max(max(row) for row in d)
    return [[value / top for value in row] for row in d]


def irg(student, teacher, vertex_weight, edge_weight, projected=None):
    """λ_v · mean_i ‖s_i − t_i‖² / D + λ_e · mean_ij (A^s_ij − A^t_ij)²."""
    vertex_rows = projected if projected is not None else student
    vertex = sum(sum((a - b) ** 2 for a, b in zip(s, t)) for s, t in zip(vertex_rows, teacher)) / (
        len(teacher) * len(teacher[0]))
    a_s, a_t = irg_edges(student), irg_edges(teacher)
    edge = sum((x - y) ** 2 for row_s, row_t in zip(a_s, a_t) for x, y in zip(row_s, row_t)) / len(student) ** 2
    return vertex_weight * vertex + edge_weight * edge


def numeric_gradient(reference, student, step=1e-6):
    """The gradient of a float64 reference at `student` by central differences (error ~ step² · third derivative)."""
    numeric = torch.zeros_like(student)
    flat = student.detach().reshape(-1)
    for index in range(flat.numel()):
        ahead, behind = flat.clone(), flat.clone()
        ahead[index] += step
        behind[index] -= step
        numeric.view(-1)[index] = (reference(ahead.view_as(student)) - reference(behind.view_as(student))) / (2 * step)
    return numeric
