"""The preference-hint lexicon (original §5.4 step 8), extended from English to es, pt and ru.

A text "talks about tastes" when one of its words is in `WORDS` or starts with one of `STEMS`
(stems cover inflection: Russian cases, Romance plurals and genders). All languages are checked
for every message, so a wrong language hint does not hide a preference.
"""

from __future__ import annotations

import re

__all__ = ["STEMS", "WORDS", "mentions_preference", "words"]

WORDS: frozenset[str] = frozenset(
    # en (the original's list)
    "book books novel novels movie movies film films music song songs album albums artist artists "
    "band bands tv show shows series podcast podcasts game games food foods cuisine taste tastes "
    "flavor flavour favorite favorites favourite favourites preference preferences genre genres "
    # es
    "peli pelis cine tele género géneros genero generos gusto gustos plato platos "
    # pt
    "filme filmes livro livros gênero gêneros prato pratos "
    # ru (short forms that a stem would over-match)
    "еда еду еды едой кино шоу игра игры игру игр игрой".split()
)

STEMS: tuple[str, ...] = (
    # es
    "libro", "novela", "películ", "pelicul", "músic", "music", "canci", "álbum", "album", "artista",
    "banda", "serie", "podcast", "juego", "videojueg", "comida", "cocina", "sabor", "favorit",
    "preferid", "preferenc", "televis",
    # pt
    "romance", "cinema", "canç", "cancao", "série", "jogo", "videogame", "culinár", "cozinha",
    "preferênc", "televisã", "gosto",
    # ru
    "книг", "книжк", "роман", "фильм", "музык", "песн", "альбом", "артист", "исполнител", "сериал",
    "подкаст", "видеоигр", "кухн", "вкус", "любим", "предпочит", "предпочтен", "жанр", "блюд",
)

_WORD = re.compile(r"[^\W\d_]+")


def words(text: str) -> list[str]:
    """Lower-cased words of `text`: maximal runs of letters in any script (accents kept)."""
    return _WORD.findall(text.lower())


def mentions_preference(text: str) -> bool:
    """Whether `text` names a kind of taste (books, films, music, food, favourites...) in en/es/pt/ru."""
    for word in words(text):
        if word in WORDS or word.startswith(STEMS):
            return True
    return False
