"""The words the local rules know, in English, German, Spanish and French, and the text's preparation.

Pure data and pure functions. Every word is stored folded (case-folded, accents removed, ``ß`` as ``ss``), the
form :func:`fold` gives a token, so "Éteins", "eteins" and "ÉTEINS" are one word. A word maps to a *concept*
(``ON``, ``OFF``, ``SET``, ``NEG`` ...); the parser in :mod:`.local` decides what a concept means for a device.
Number words are turned into digits by ``text2num`` (the language is guessed from the words first), after the
phrases it gets wrong are rewritten here: "por ciento" (it reads "ciento" as 100), "a second" (an ordinal to
it), the halves and quarters of durations, the German particle "ein" ("schalte die Pumpe ein", not "one").
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

LANGUAGES = ("en", "de", "es", "fr")


def fold(word: str) -> str:
    """Case-folded, without accents: the form every lexicon entry is stored in."""
    decomposed = unicodedata.normalize("NFD", word.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c)).replace("ß", "ss")


def _words(*groups: str) -> frozenset[str]:
    return frozenset(fold(w) for group in groups for w in group.split())


# --- concepts --------------------------------------------------------------------------------------------------
# One word, one concept, whatever the language; a word that means different things in two languages ("an", "para",
# "est") is listed per language in LANGUAGE_ONLY and read only in that language.

_CONCEPTS: dict[str, str] = {
    # switch on: verbs that mean it alone
    "ON": "activate enable energize energise engage "
    "einschalten anschalten aktiviere aktivieren aktivier einschalte "
    "enciende encender enciendas enciendan prende prender activa activar conecta conectar "
    "allume allumer allumez active activer activez",
    "OFF": "deactivate disable deenergize deenergise de-energize de-energise kill cut release disengage "
    "ausschalten abschalten deaktiviere deaktivieren deaktivier ausschalte "
    "apaga apagar apagues desactiva desactivar desconecta desconectar corta cortar "
    "eteins eteindre eteignez coupe couper coupez desactive desactiver desactivez",
    "START": "start starts starting run launch begin starte starten startet arranca arrancar arranque inicia iniciar "
    "demarre demarrer demarrez lance lancer lancez",
    "STOP": "stop stopping halt stopp stoppe stoppen stoppt halte anhalten beende beenden para parar paren deten "
    "detener detenga arrete arreter arretez stoppez",
    "OPEN": "open opens opening offne offnen abre abrir ouvre ouvrir ouvrez",
    "CLOSE": "close closing shut schliesse schliessen schliess cierra cerrar ferme fermer fermez",
    "PVERB": "turn turning switch switching power flip schalte schalt schalten mach mache machen",
    "PART_ON": "on",
    "PART_OFF": "off aus ab",
    "SET": "set change adjust put make bring stelle stell stellen setze setz setzen andere aendere "
    "pon poner ajusta ajustar establece establecer cambia cambiar fija fijar configura configurar "
    "regle regler reglez mets mettre mettez ajuste ajuster change changer fixe fixer definis definir",
    "READ": "read check query poll measure refresh sample lies lese lesen prufe prufen abfragen messe messen "
    "lee leer consulta consultar mide medir comprueba comprobar revisa revisar "
    "lis lire mesure mesurer verifie verifier releve relever interroge interroger",
    "IDENTIFY": "identify blink flash locate identifiziere blinke blinken identifica parpadea identifie clignote",
    "ALL": "all every everything both alle alles todos todas todo tous toutes tout",
    "Q": "what whats which how hows status state is are does was wie welche welcher welches wieviel "
    "cual cuales que como cuanto cuanta quel quelle quels quelles comment combien "
    "zustand estado etat",
    "MODAL": "can could would will kannst konntest koenntest kannst puedes podrias puede podria peux pourrais "
    "pourriez pouvez",
    "NEG": "not never dont don't nicht nie kein keine keinen no nunca jamas ne pas jamais",
    "CONJ": "and then also plus after und dann danach sowie y e luego despues et puis ensuite",
    "FOR": "for during lang fur durante pendant",
    "TO": "to at auf zu a al en",
    "BY": "by um up down increase decrease raise lower reduce more less faster slower higher lower "
    "erhohe erhoehe verringere sube baja aumenta reduce augmente baisse diminue",
    "IN": "in within nach dans dentro",
    "IF": "if whether ob",
    "COND": "unless when whenever once until wenn falls sobald ausser cuando salvo quand lorsque sauf",
    "HEDGE": "maybe perhaps possibly probably vielleicht eventuell quizas quiza tal acaso peut etre",
    # A time to come: "start the pump tomorrow" is not an order for now (and nothing here schedules for later).
    "LATER": "tomorrow tonight later soon someday morgen spater spaeter bald manana pronto demain bientot tard",
    # A length nobody gave: "run the pump for a bit" would run it until someone remembers.
    "VAGUE": "bit while briefly moment weile kurz rato momento rato instant moment peu",
    # More than once: one command at a time, and the same one twice is not a thing a device does.
    "REPEAT": "twice thrice repeatedly zweimal dreimal mehrmals veces fois",
    "UNTIL": "until till bis hasta jusqu jusque",
    "OF": "of from von vom der de del du des",
    "FILLER": "please pls plz kindly now right immediately asap quickly quick thanks thank thx cheers ty hey hi "
    "hello ok okay yo mate gateway the a an my our this that i id i'd we like want wanna need to you me "
    "let lets let's go ahead just again for us u would be so well could it its it's there some your "
    "bitte jetzt sofort mal die der das den dem des ein eine einen einem danke hallo du ihr mir uns doch "
    "schnell gleich los "
    "por favor ahora la el los las lo un una unos gracias hola ya me nos ahorita rapido inmediatamente "
    "s il vous te plait svp stp merci maintenant le les l un une bonjour salut tout suite vite immediatement "
    "je veux voudrais quiero quisiera mochte ich will",
    "STATUS": "status state reading readings value values condition zustand werte estado lectura valores "
    "etat lecture valeurs",
}

# Words whose concept depends on the language of the sentence (default English).
LANGUAGE_ONLY: dict[str, dict[str, str]] = {
    "de": {"an": "PART_ON", "ist": "Q", "sind": "Q", "lauft": "Q", "laeuft": "Q", "was": "Q", "in": "IN"},
    "es": {"esta": "Q", "estan": "Q", "para": "STOP", "por": "FOR", "en": "TO", "si": "IF"},
    "fr": {"est": "Q", "pour": "FOR", "en": "TO", "marche": "FILLER", "si": "IF"},
    "en": {"an": "FILLER", "is": "Q", "are": "Q", "does": "Q", "do": "FILLER", "was": "Q"},
}

# Multi-word phrases, matched before single words (longest first).
PHRASES: dict[tuple[str, ...], str] = {
    tuple(fold(p).split()): concept
    for concept, phrases in {
        "START": [
            "power up",
            "fire up",
            "kick on",
            "get going",
            "mets en marche",
            "met en marche",
            "mettre en marche",
            "pon en marcha",
            "poner en marcha",
            "ponga en marcha",
            "setze in gang",
            "in betrieb nehmen",
            "nimm in betrieb",
        ],
        "STOP": ["shut down", "power down", "turn off", "cut off", "switch off", "shut off"],
        "ON": ["turn on", "switch on"],
        "READ": ["take a reading", "get a reading", "read out", "give me a reading"],
        "Q": ["tell me", "show me", "give me", "est ce que", "est ce qu", "how much", "how many", "dime", "zeig mir"],
        "NEG": ["do not", "does not", "no longer", "never mind", "nevermind"],
        "FILLER": [
            "thank you",
            "por favor",
            "s il vous plait",
            "s il te plait",
            "i would like",
            "i d like",
            "would you",
            "could you",
            "can you",
            "will you",
            "right now",
            "right away",
            "at once",
            "tout de suite",
            "de inmediato",
            "en seguida",
            "kannst du",
            "konntest du",
            "peux tu",
            "pourriez vous",
            "pouvez vous",
            "puedes",
        ],
        "CONJ": ["and then", "as well as", "after that", "und dann", "y luego", "y despues", "et puis", "et ensuite"],
    }.items()
    for p in phrases
}
# "turn off" and "switch off" read as phrases only to keep "off" from being a preposition after them; they are
# switch-off requests like "turn ... off".
PHRASES[("turn", "off")] = "OFF"
PHRASES[("switch", "off")] = "OFF"
PHRASES[("shut", "off")] = "OFF"

# "is", "ist", "está": a sentence that says what something *is* asks or tells a state; it orders nothing.
COPULAS = _words("is are ist sind esta estan est sont")

# What a device is while it runs: yes/no questions ("is the pump running?", "¿está encendida?").
STATE_ON = _words(
    "on running runs started active open opened energized energised closed_contact "
    "an ein lauft laeuft laufen aktiv offen geoffnet "
    "encendida encendido funcionando activa activo abierta abierto marcha "
    "allume allumee marche active ouverte ouvert tourne fonctionne"
)
STATE_OFF = _words(
    "off stopped idle inactive closed shut aus gestoppt inaktiv geschlossen zu apagada apagado parada parado "
    "cerrada cerrado detenida detenido eteint eteinte arrete arretee fermee ferme"
)

# --- units -------------------------------------------------------------------------------------------------------

TIME_UNITS: dict[str, float] = {
    **dict.fromkeys(_words("ms millisecond milliseconds"), 0.001),
    **dict.fromkeys(
        _words("s sec secs second seconds sek sekunde sekunden seg segs segundo segundos seconde secondes"), 1.0
    ),
    **dict.fromkeys(_words("m min mins minute minutes minuten minuto minutos"), 60.0),
    **dict.fromkeys(_words("h hr hrs hour hours std stunde stunden hora horas heure heures"), 3600.0),
    **dict.fromkeys(_words("d day days tag tage tagen dia dias jour jours"), 86400.0),
}
PERCENT = _words("% percent pct percentage prozent porcentaje pourcentage")
CELSIUS = _words("°c °C c celsius degrees degree deg grad grados grado degres degre")
FAHRENHEIT = _words("°f °F f fahrenheit")
# Named levels of a parameter, as a fraction of its range ("half speed", "à fond", "al máximo").
LEVELS: dict[str, float] = {
    **dict.fromkeys(_words("max maximum full fullest top highest fond maximo maxima volle voll vollgas"), 1.0),
    **dict.fromkeys(_words("min minimum lowest minimo minima minimal"), 0.0),
    **dict.fromkeys(_words("half halfway halbe halb mitad media moitie demi"), 0.5),
}

CHANNEL_NOUNS = _words("channel channels ch output outputs port kanal kanale ausgang canal canales salida voie sortie")
ORDINALS: dict[str, int] = {
    fold(w): i
    for i, words in enumerate(
        [
            "first erste ersten erster primero primera primer premier premiere",
            "second zweite zweiten zweiter segundo segunda deuxieme seconde",
            "third dritte dritten dritter tercero tercera tercer troisieme",
            "fourth vierte vierten vierter cuarto cuarta quatrieme",
            "fifth funfte fuenfte funften quinto quinta cinquieme",
            "sixth sechste sechsten sexto sexta sixieme",
            "seventh siebte siebten septimo septima septieme",
            "eighth achte achten octavo octava huitieme",
        ],
        start=1,
    )
    for w in words.split()
}
NUMBER_MARK = _words("number nr no num nummer numero")

# Nouns every language uses for the usual kinds of device, so "die Pumpe" finds the pump the profile calls a pump.
TRANSLATIONS: dict[str, frozenset[str]] = {
    "pump": _words("pumpe bomba pompe"),
    "valve": _words("ventil valvula vanne electrovanne magnetventil"),
    "relay": _words("relais rele"),
    "sensor": _words("fuhler capteur sonde"),
    "meter": _words("zahler stromzahler medidor contador compteur"),
    "board": _words("platine karte placa tarjeta carte"),
    "fan": _words("lufter ventilador ventilateur"),
    "light": _words("licht lampe luz lumiere"),
    "heater": _words("heizung calefactor chauffage"),
}
VALVE_WORDS = _words("valve valves ventil valvula vanne electrovanne magnetventil tap faucet")

# Words for telemetry points, by the word a point's name or description uses ("humidity_pct" -> "humidity").
POINT_WORDS: dict[str, frozenset[str]] = {
    "temperature": _words("temperature temp temperatures hot warm cold degrees temperatur temperatura warm kalt"),
    "humidity": _words("humidity humid moisture feuchtigkeit luftfeuchtigkeit feuchte humedad humidite"),
    "pressure": _words("pressure druck luftdruck presion pression"),
    "battery": _words("battery batt batterie akku bateria"),
    "power": _words("power watts wattage leistung potencia puissance consumption"),
    "energy": _words("energy kwh energie energia consumption verbrauch consumo consommation"),
    "voltage": _words("voltage volts spannung tension voltaje"),
    "current": _words("current amps amperes amperage strom corriente courant"),
    "frequency": _words("frequency hz frequenz frecuencia frequence"),
    "factor": _words("factor cos phi"),
    "speed": _words("speed fast rpm drehzahl geschwindigkeit velocidad vitesse"),
    "running": _words("running stopped laufen lauft funcionando marche tourne"),
}

# Sentence shapes the parser cannot act on safely: it says so instead of guessing.
LANGUAGE_MARKERS: dict[str, frozenset[str]] = {
    "en": _words(
        "the turn switch on off please for minutes minute seconds hours hour set to is what what's pump valve "
        "relay start stop read and of it run check how"
    ),
    "de": _words(
        "schalte schalt mach mache die der das den ist bitte pumpe ventil aus ein fur minuten stunde stunden "
        "sekunden stelle setze lauft laeuft wie was prozent und nicht starte stoppe lies zahler relais"
    ),
    "es": _words(
        "enciende apaga la el los las bomba valvula al por favor durante minutos hora horas segundos pon esta "
        "cual que como arranca para deten lee medidor rele y no humedad"
    ),
    "fr": _words(
        "allume eteins le la les pompe vanne pendant heure heures secondes regle mets est quelle quel "
        "comment demarre arrete lis compteur relais et ne pas humidite s il vous plait"
    ),
}


def concept_table() -> dict[str, str]:
    out: dict[str, str] = {}
    for concept, words in _CONCEPTS.items():
        for word in words.split():
            out.setdefault(fold(word), concept)
    return out


CONCEPTS = concept_table()


def guess_language(tokens: Iterable[str]) -> str:
    """The language with the most marker words among the tokens; English when none stands out."""
    scores = dict.fromkeys(LANGUAGES, 0)
    for token in tokens:
        for lang, markers in LANGUAGE_MARKERS.items():
            if token in markers:
                scores[lang] += 1
    best = max(scores, key=lambda k: scores[k])
    return best if scores[best] > scores["en"] else "en"


# --- preparing the text ----------------------------------------------------------------------------------------

_REWRITES: dict[str, list[tuple[str, str]]] = {
    "all": [
        (r"(\d)\s*[.,]?\s*(?:per\s*cent|pour\s*cent|por\s*ciento|prozent|percent)\b", r"\1 %"),
        (r"\b(\d+)\s*h\s*(\d{1,2})\b(?!\s*(?:%|min|s\b))", r"\1 h \2 min"),
    ],
    "en": [
        (r"\b(?:an?|one) hour and a half\b", "90 minutes"),
        (r"\b(?:an?|one) and a half hours?\b", "90 minutes"),
        (r"\bhalf an hour\b|\ba half hour\b|\bhalf hour\b", "30 minutes"),
        (r"\b(?:a )?quarter (?:of an )?hour\b", "15 minutes"),
        (r"\b(?:an?|one) minute and a half\b", "90 seconds"),
        (r"\bhalf a minute\b", "30 seconds"),
        (r"\b(?:a|one) second\b", "1 seconds"),
        (r"\b(\d+(?:[.,]\d+)?) second\b", r"\1 seconds"),  # text2num reads "1 second" as "1 2nd"
        (r"\b(?:an|one) hour\b", "1 hour"),
        (r"\b(?:a|one) minute\b", "1 minute"),
        (r"\b(?:a|one) day\b", "1 day"),
        (r"\b(?:a )?couple (?:of )?(minutes|hours|seconds)\b", r"2 \1"),
        (r"\bde[- ]?energi([sz])e\b", r"deenergi\1e"),
        (r"\bfull (?:speed|power|blast)\b", "full"),
        (r"\bhalf (?:speed|power|way)\b", "half"),
        (r"\b(\w+) and a half (hours?|minutes?)\b", r"\1.5 \2"),
    ],
    "de": [
        (r"\beine halbe stunde\b|\bhalbe stunde\b", "30 minuten"),
        (r"\b(?:anderthalb|eineinhalb) stunden?\b", "90 minuten"),
        (r"\beine viertelstunde\b|\bviertelstunde\b|\beine viertel stunde\b", "15 minuten"),
        (r"\beine stunde\b|\beiner stunde\b", "1 stunde"),
        (r"\beine minute\b|\beiner minute\b", "1 minute"),
        (r"\beine sekunde\b", "1 sekunde"),
        (r"\beinen tag\b", "1 tag"),
        (r"\bein\s*$", "an"),  # the particle of "schalte die Pumpe ein": on, not the number one
        (r"\bauf\s*$", "open"),  # "Ventil auf", "mach das Ventil auf"
        (r"\bzu\s*$", "close"),
        (r"\bein\s+(?=(?:f[uü]r|bitte|sofort|jetzt)\b)", "an "),
    ],
    "es": [
        (r"\bmedia hora\b", "30 minutos"),
        (r"\b(?:una )?hora y media\b", "90 minutos"),
        (r"\bun cuarto de hora\b", "15 minutos"),
        (r"\buna hora\b", "1 hora"),
        (r"\bun minuto\b", "1 minuto"),
        (r"\bun segundo\b", "1 segundo"),
        (r"\bun d[ií]a\b", "1 dia"),
        (r"\b(\w+) horas? y media\b", r"\1.5 horas"),
    ],
    "fr": [
        (r"\b(?:une )?demi[- ]heure\b", "30 minutes"),
        (r"\b(?:une )?heure et demie\b", "90 minutes"),
        (r"\bun quart d'? ?heure\b", "15 minutes"),
        (r"\bune heure\b", "1 heure"),
        (r"\bune minute\b", "1 minute"),
        (r"\bune seconde\b", "1 seconde"),
        (r"\bun jour\b", "1 jour"),
        (r"\b(\w+) heures? et demie\b", r"\1.5 heures"),
    ],
}
_COMPILED = {lang: [(re.compile(p), r) for p, r in rules] for lang, rules in _REWRITES.items()}


def rewrite(text: str, lang: str) -> str:
    """Durations and percentages in words rewritten as numbers and units; English's always (technicians mix it
    into every language), then the sentence's own language's."""
    for pattern, repl in _COMPILED["all"]:
        text = pattern.sub(repl, text)
    for pattern, repl in _COMPILED["en"]:
        text = pattern.sub(repl, text)
    if lang != "en":
        for pattern, repl in _COMPILED.get(lang, ()):
            text = pattern.sub(repl, text)
    return text


def after_digits(text: str) -> str:
    """What only reads once the numbers are digits: "50 por ciento" (text2num made "50 por 100" of it)."""
    text = re.sub(r"(\d)\s*(?:por|pour|per)\s*(?:100|ciento|cent)\b", r"\1 %", text)
    for pattern, repl in _COMPILED["all"]:
        text = pattern.sub(repl, text)
    return text


def words_to_digits(text: str, lang: str) -> str:
    """Number words as digits ("forty five" -> "45", "fünfundvierzig" -> "45"); adjacent numbers stay apart
    ("four fifty" -> "4 50"), which the parser refuses as two numbers."""
    from text_to_num import alpha2digit

    try:
        return str(alpha2digit(text, lang, threshold=0))
    except Exception:  # a library error is no reason to lose the sentence: the digits already in it still count
        return text
