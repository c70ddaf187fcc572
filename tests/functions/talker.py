"""A function that prints and logs, for `faas logs`."""

from faas import BadRequest, function


@function(name="talker", timeout_s=10)
def talker(event: dict, ctx) -> dict:
    word = str(event.get("word", ""))
    if not word:
        raise BadRequest("say a word: the event needs a non-empty 'word'")
    print(f"talker says {word}")
    ctx.log.info("talker_logged", word=word)
    return {"said": word}
