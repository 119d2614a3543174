"""A fixed English text for perplexity and next-token agreement checks (written for this project)."""

EVAL_TEXT = """The village sat at the bend of a slow river, where the water turned brown in spring and clear again by \
midsummer. Most of the houses were built of grey stone taken from the quarry on the hill, and their roofs were \
covered with slate that shone like fish scales after rain. In the mornings the baker opened his shutters first, and \
the smell of bread drifted down the main street before anyone else was awake.

Every child in the village learned to swim in the river, and every parent warned them about the deep pool below the \
mill. The pool was calm on the surface, but the current underneath was strong enough to pull a grown man off his \
feet. Old stories said that a horse and cart had vanished there one winter, and that on quiet nights you could still \
hear the wheels turning under the water. Nobody really believed it, yet nobody swam there after dark.

The school had two rooms and one teacher, a patient woman named Clara who had come from the city twenty years \
before and never left. She taught reading, arithmetic, and a little history, and on Fridays she read aloud from books \
that the children could not yet manage on their own. When the weather was fine she took the whole class outside to \
draw the trees, count the birds, and measure the shadow of the church tower at noon. Her pupils grew up to be \
farmers, carpenters, nurses, and clerks, and many of them still wrote to her at the new year.

Trade came to the village on market day, which was Thursday. Farmers brought eggs, cheese, apples, and wool; a man \
from the coast sold dried fish from the back of his van; and a woman with a folding table mended watches and \
sharpened knives. Prices were written in chalk on small boards, and everyone argued about them, although the \
argument was more a kind of greeting than a real disagreement. By three in the afternoon the square was empty again, \
except for the pigeons and the boy who swept up the straw.

In the autumn of that year a stranger arrived on the evening train. He carried a leather case and a folded map, and \
he asked the station master for the way to the old observatory on the ridge. The observatory had been closed for as \
long as anyone could remember. Its dome was rusted shut, its door was held with a chain, and sheep grazed in the \
long grass around its walls. The station master told him so, but the stranger only smiled, thanked him, and set off \
up the hill with a lantern as the light faded.

For three weeks the village talked about little else. Some said he was an engineer sent by the government, others \
that he was a writer looking for a quiet place to finish a novel. The baker claimed that he bought two loaves every \
morning and paid with coins so old that they had to be checked against a catalogue. Clara, who had met him on the \
road, said only that he was polite, that he knew the names of the stars, and that he had asked whether any of the \
children might like to see them through a telescope.

On the first clear night of November, eleven children and four parents climbed the ridge. The chain was gone from the \
door, the dome had been oiled and turned, and a long brass instrument pointed through the open slit at the sky. One \
by one the children stood on a wooden box and looked. They saw the rings of Saturn, small and perfect, like a drawing \
in a book; they saw the craters of the moon, sharp along the line between light and shadow; and they saw a faint \
smudge that the stranger said was another galaxy, so far away that its light had left before there were people on \
the earth.

The walk home was slower than the walk up. Nobody spoke much. The river was loud in the dark, and above it the sky \
seemed deeper than it had ever been. In the years that followed, several of those children studied mathematics and \
physics, and one of them became the director of a large observatory in the mountains. When she was asked, much \
later, how she had chosen her work, she always told the same story: a stone village, a rusted dome, a patient \
stranger, and a night so clear that the whole universe seemed to lean down and look back.
"""
