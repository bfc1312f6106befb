"""Few-step distillation: backward simulation, the real score is the teacher with experts off, one update."""

import copy

import pytest
import torch

import tsm
from tsm.bench.digits_model import pretrain_base
from tsm.models.digits import DigitsFamily
from tsm.recipes.distill import STEPS, Distiller, distill_spec, generator_input
from tsm.sampling import step_to

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return pretrain_base(tmp_path_factory.mktemp("distill") / "base", steps=2, batch=8, progress=False)


def student(base, seed: int = 0):
    c = DigitsFamily().load(str(base))
    teacher = copy.deepcopy(c.denoiser)
    torch.manual_seed(seed)
    tsm.add_experts(c.denoiser, distill_spec(rank=2, targets=ATTN))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # distinct experts, so that a wrong step or a wrong expert shows
        for _, layer in tsm.expert_layers(c.denoiser):
            for b in layer.lora_B.values():
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    return c, teacher


def test_each_generator_step_has_its_own_expert():
    spec = distill_spec(rank=2, targets=ATTN)
    assert [int(tsm.expert_index(t, spec.scales[0])) for t in STEPS] == [3, 2, 1, 0]


def test_backward_simulation_feeds_step_k_with_the_generators_own_output(base):
    c, _ = student(base)
    cond = c.family.encode_prompt(c, ["digit 1", "digit 2"])
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(generator_input(c, 0, noise, cond, STEPS, torch.Generator()), noise)
    got = generator_input(c, 3, noise, cond, STEPS, torch.Generator().manual_seed(4))
    # by hand: three generator steps, each re-noised with the next draw of the same generator
    g, x = torch.Generator().manual_seed(4), noise
    with torch.no_grad():
        for k in range(3):
            t = torch.full((2,), STEPS[k])
            x = step_to(
                c.objective,
                c.denoiser(x, t, **cond).sample,
                x,
                t,
                STEPS[k + 1],
                torch.randn(x.shape, generator=g),
            )
    assert torch.equal(got, x)
    with (
        torch.no_grad(),
        tsm.experts_off(c.denoiser),
    ):  # the teacher's own chain differs: the experts were used
        t = torch.full((2,), STEPS[0])
        teacher_x0 = c.objective.split(c.denoiser(noise, t, **cond).sample, noise, t)[0]
    with torch.no_grad():
        student_x0 = c.objective.split(c.denoiser(noise, t, **cond).sample, noise, t)[0]
    assert not torch.allclose(teacher_x0, student_x0)


def test_real_score_is_the_teacher_with_experts_off(base):
    c, teacher = student(base)
    d = Distiller(c, fake_updates=1)
    cond, uncond = c.family.encode_prompt(c, ["digit 5"] * 2), c.family.encode_prompt(c, [""] * 2)
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([300, 800])
    got = d.real_score(x, t, cond, uncond)
    with torch.no_grad():  # a pristine copy of the teacher, called the same way (one batch of [uncond; cond])
        emb = torch.cat([uncond["encoder_hidden_states"], cond["encoder_hidden_states"]])
        pu, pc = teacher(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=emb).sample.chunk(2)
    want = c.objective.split(pu + d.guidance * (pc - pu), x, t)[0]
    assert torch.equal(got, want)
    # the fake score is a separate copy; the generator kept its experts and its hook
    assert not any(True for _ in tsm.expert_layers(teacher))
    c.denoiser(x, t, encoder_hidden_states=cond["encoder_hidden_states"])
    assert tsm.get_routing(c.denoiser).state.main.ids.tolist() == [1, 3]


def test_one_update_trains_only_the_sampled_steps_expert(base):
    c, _ = student(base)
    d = Distiller(c, fake_updates=2)
    layer = c.denoiser.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    before = {k: v.detach().clone() for k, v in layer.lora_B.items()}
    fake_layer = d.fake.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    out = d.step(["digit 3", "digit 8"], torch.Generator().manual_seed(2))
    k = out["step"]
    expert = f"s0_i{int(tsm.expert_index(STEPS[k], 4))}"
    changed = {key for key, v in layer.lora_B.items() if not torch.equal(v, before[key])}
    assert changed == {expert}
    assert fake_layer.lora_B["s0_i0"].abs().sum() > 0  # the fake score's LoRA trained
    assert all(v == v for v in (out["generator"], out["fake"]))


def test_gan_phase_trains_the_head_and_reaches_the_generator(base):
    real = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    after = {}
    for gan in (False, True):
        c, _ = student(base)
        torch.manual_seed(0)
        d = Distiller(c, fake_updates=1, gan_weight=0.5)
        head = {k: v.detach().clone() for k, v in d.head.state_dict().items()}
        out = d.step(["digit 3", "digit 8"], torch.Generator().manual_seed(2), real=real, gan=gan)
        changed = any(not torch.equal(v, d.head.state_dict()[k]) for k, v in head.items())
        assert changed == gan  # the head learns only in the GAN phase
        assert ("gan_generator" in out) == gan and ("gan_head" in out) == gan
        layer = c.denoiser.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
        after[gan] = {k: v.detach().clone() for k, v in layer.lora_B.items()}
        if gan:
            assert out["generator"] > out["dm"]  # dm + weight * softplus(-logit) > dm
    # the same draws, with and without the GAN term: the generator's update differs
    assert any(not torch.equal(after[True][k], after[False][k]) for k in after[True])
    with pytest.raises(ValueError, match="real latents"):
        d.step(["digit 3", "digit 8"], torch.Generator().manual_seed(2), gan=True)
