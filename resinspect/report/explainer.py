"""The short residual-learning explainer shown at the top of every report (MathML: renders offline).

Each paragraph has an anchor that plugin sections link to (``Section.docs``).
The long version is docs/residual-learning.md.
"""

ANCHORS = (
    "explainer-residual",
    "explainer-gradient",
    "explainer-paths",
    "explainer-degradation",
    "explainer-responses",
    "explainer-similarity",
    "explainer-spectra",
    "explainer-landscape",
    "explainer-sanity",
    "explainer-streams",
    "explainer-lens",
    "explainer-rank",
    "explainer-heads",
)

EXPLAINER_HTML = """
<p id="explainer-residual"><strong>The residual block.</strong> A block computes
<math><mi>y</mi><mo>=</mo><mi>x</mi><mo>+</mo><mi>F</mi><mo>(</mo><mi>x</mi><mo>)</mo></math>:
its input <math><mi>x</mi></math> travels unchanged along the <em>skip</em> (shortcut) and the
<em>branch</em> <math><mi>F</mi></math> (conv–BN–ReLU–conv–BN) only has to learn a correction. When a
block changes resolution or width the skip becomes a projection (1×1 convolution + BN). If the best
thing a block can do is nothing, it can learn <math><mi>F</mi><mo>≈</mo><mn>0</mn></math>, which is far
easier than learning the identity through a stack of nonlinear layers (He et al. 2016).</p>

<p id="explainer-gradient"><strong>Why the gradient does not vanish.</strong> Differentiating the block,
<math><mfrac><mrow><mo>∂</mo><mi>L</mi></mrow><mrow><mo>∂</mo><mi>x</mi></mrow></mfrac><mo>=</mo>
<mfrac><mrow><mo>∂</mo><mi>L</mi></mrow><mrow><mo>∂</mo><mi>y</mi></mrow></mfrac>
<mrow><mo>(</mo><mn>1</mn><mo>+</mo><mfrac><mrow><mo>∂</mo><mi>F</mi></mrow><mrow><mo>∂</mo><mi>x</mi></mrow></mfrac><mo>)</mo></mrow></math>:
the skip contributes the gradient of the output unchanged, the branch adds its own part. Unrolled over
blocks <math><mi>l</mi></math> to <math><mi>L</mi></math> with identity skips
(He et al. 2016, <em>Identity Mappings in Deep Residual Networks</em>, eqs. 4–5):
<math><msub><mi>x</mi><mi>L</mi></msub><mo>=</mo><msub><mi>x</mi><mi>l</mi></msub><mo>+</mo>
<munderover><mo>∑</mo><mrow><mi>i</mi><mo>=</mo><mi>l</mi></mrow><mrow><mi>L</mi><mo>−</mo><mn>1</mn></mrow></munderover>
<mi>F</mi><mo>(</mo><msub><mi>x</mi><mi>i</mi></msub><mo>)</mo></math> and
<math><mfrac><mrow><mo>∂</mo><mi>ℒ</mi></mrow><mrow><mo>∂</mo><msub><mi>x</mi><mi>l</mi></msub></mrow></mfrac>
<mo>=</mo><mfrac><mrow><mo>∂</mo><mi>ℒ</mi></mrow><mrow><mo>∂</mo><msub><mi>x</mi><mi>L</mi></msub></mrow></mfrac>
<mrow><mo>(</mo><mn>1</mn><mo>+</mo><mfrac><mo>∂</mo><mrow><mo>∂</mo><msub><mi>x</mi><mi>l</mi></msub></mrow></mfrac>
<munderover><mo>∑</mo><mrow><mi>i</mi><mo>=</mo><mi>l</mi></mrow><mrow><mi>L</mi><mo>−</mo><mn>1</mn></mrow></munderover>
<mi>F</mi><mo>(</mo><msub><mi>x</mi><mi>i</mi></msub><mo>)</mo><mo>)</mo></mrow></math>.
The "1" means the gradient of the last layer reaches every earlier block directly, not as a product of
many Jacobians that can shrink towards zero as in a plain network. (In the post-activation blocks used
here a ReLU follows the addition, so the skip is identity only where the sum is positive.)</p>

<p id="explainer-paths"><strong>An ensemble of paths.</strong> Expanding
<math><mi>y</mi><mo>=</mo><mi>x</mi><mo>+</mo><mi>F</mi><mo>(</mo><mi>x</mi><mo>)</mo></math>
block by block shows that a network of <math><mi>N</mi></math> blocks contains
<math><msup><mn>2</mn><mi>N</mi></msup></math> paths from input to output, one for each choice of skip or
branch in every block; path lengths follow Binomial(<math><mi>N</mi></math>, ½), so most paths are of
moderate length (Veit et al. 2016). Deleting one block removes only half of the paths and leaves the
rest intact, which is why a trained ResNet barely notices the loss of one block, while deleting a layer
of a plain network cuts its only path. Which paths carry the <em>gradient</em> is a separate question:
at a fixed input the gradient is exactly a sum
<math><mi>g</mi><mo>=</mo><msub><mo>∑</mo><mi>k</mi></msub><msub><mi>g</mi><mi>k</mi></msub></math>
over path lengths. Veit et al. found that in a trained ResNet-110 most of it comes from short paths (5–17
of 54 blocks): the effective network is an ensemble of shallow ones.</p>

<p id="explainer-degradation"><strong>The degradation problem.</strong> Deeper plain networks train to
<em>higher</em> training error than shallower ones (He et al. 2016): not overfitting, but an
optimisation difficulty. Their gradients also become "shattered", close to white noise across inputs
(Balduzzi et al. 2017): move the input a little and the gradient of a deep plain network changes
unrecognisably, while a residual network's stays correlated over long distances, like brown noise. A gradient
that does not predict itself a step away is a poor guide for descent. The plain twin (<code>--twin</code>) is the same network without shortcuts, so the
comparison isolates what the shortcuts do.</p>

<p id="explainer-responses"><strong>Small responses.</strong> In trained ResNets the branches' outputs
(their "responses") are generally small and shrink with depth: each block nudges the representation
rather than replacing it (He et al. 2016, Fig. 7). A block whose
<math><mo>‖</mo><mi>F</mi><mo>(</mo><mi>x</mi><mo>)</mo><mo>‖</mo><mo>/</mo><mo>‖</mo><mi>x</mi><mo>‖</mo></math>
is near zero is close to the identity.</p>

<p id="explainer-similarity"><strong>How similar are two layers' representations?</strong> Centred kernel
alignment (CKA; Kornblith et al. 2019) compares the responses of two layers to the same images: 1 when one
is a rotation or rescaling of the other, near 0 when they are unrelated, whatever their widths. A residual
block adds a correction to its input, so its output stays similar to it; in deep or wide ResNets whole runs
of consecutive blocks come out nearly identical, a "block structure" (Nguyen, Raghu &amp; Kornblith 2021)
that marks blocks which barely change the representation and could be removed.</p>

<p id="explainer-spectra"><strong>What the weights' spectra say.</strong> The eigenvalues of a layer's
<math><msup><mi>W</mi><mi>T</mi></msup><mi>W</mi></math> form a random-matrix bulk at initialisation;
training grows a heavy, power-law tail
<math><mi>p</mi><mo>(</mo><mi>λ</mi><mo>)</mo><mo>∝</mo><msup><mi>λ</mi><mrow><mo>−</mo><mi>α</mi></mrow></msup></math>
(Martin &amp; Mahoney 2021). The smaller α, the heavier the tail and the more correlation the layer has
learned; WeightWatcher reads α between 2 and 6 as well trained, above 6 as barely trained. With a shortcut a
block only learns a correction, so its layers may stay closer to random than the plain twin's.</p>

<p id="explainer-landscape"><strong>Why residual networks are easier to train.</strong> Around its
trained weights a ResNet-56 sits in a smooth, nearly convex basin, while its plain twin's loss surface is
chaotic (Li et al. 2018, drawn along random directions whose filters are scaled to the weights' own,
"filter normalisation"). The curvature says the same in numbers: the Hessian's largest eigenvalue (the
sharpest direction; gradient descent is stable only below a learning rate of 2/λ<sub>max</sub>) and its
trace are typically much larger for the deep plain network.</p>

<p id="explainer-sanity"><strong>Trusting attribution maps.</strong> A saliency map should depend on what the
model learned. Adebayo et al. (2018) re-initialise a network's layers from the output backwards and find
that some methods produce nearly the same maps for a random network, like an edge detector of the input.
Faithfulness tests (delete the most-attributed pixels first: does the prediction collapse?) and, where
object masks are known, localisation tests complete the picture. The long version of this explainer is
<code>docs/residual-learning.md</code>.</p>

<p id="explainer-streams"><strong>Residual streams.</strong> A transformer layer adds two branches to one
stream, attention and then an MLP: <math><mi>x</mi><mo>←</mo><mi>x</mi><mo>+</mo><mi>A</mi><mo>(</mo><mi>x</mi><mo>)</mo></math>,
<math><mi>x</mi><mo>←</mo><mi>x</mi><mo>+</mo><mi>M</mi><mo>(</mo><mi>x</mi><mo>)</mo></math>. Each addition is a
<em>residual site</em> of its own, with its own lesion, its own skip to remove and its own row in every table.
Removing the attention skips is expected to hurt far more than removing the MLP skips (Ji et al. 2025).</p>

<p id="explainer-lens"><strong>Reading the stream.</strong> Because every block writes into the same stream,
the network's own head can read it early: the logit lens (nostalgebraist 2020) applies the head to an
intermediate stream, the tuned lens (Belrose et al. 2023) first maps it with a fitted affine translator.
If residual blocks refine a prediction step by step (Jastrzebski et al. 2018), the readouts approach the final
output gradually; a plain network's layers owe the head nothing until the end.</p>

<p id="explainer-rank"><strong>Rank collapse.</strong> Self-attention averages tokens: stacked without skips it
drives every token to the same vector, doubly exponentially fast in depth (Dong et al. 2021). The relative
residual <math><mo>‖</mo><mi>X</mi><mo>−</mo><mn>1</mn><msup><mover><mi>x</mi><mo>¯</mo></mover><mi>T</mi></msup><mo>‖</mo><mo>/</mo><mo>‖</mo><mi>X</mi><mo>‖</mo></math>
of the token matrix measures it; skip connections keep it away from zero.</p>

<p id="explainer-heads"><strong>Induction heads.</strong> A language model learns in context by copying: at a
token it saw before, an <em>induction head</em> attends to the token that followed the earlier occurrence and
predicts it again (Olsson et al. 2022). It works with a <em>previous-token head</em> in an earlier layer, whose
output it reads through the residual stream together with the tokens themselves. On random sequences that
repeat, the loss drops on the repeat when such heads have formed; a plain twin's second layer sees only the
first layer's output, not the tokens.</p>
"""
