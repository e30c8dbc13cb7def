//! Deterministic triage by keyword rules, so the demo shows meaningful, repeatable answers.
//!
//! The ticket text is matched, case-insensitively and on word boundaries, against keyword lists
//! in English, German, French and Spanish. The category with the most hits wins (ties go to the
//! earlier category in [`Category::ALL`]); the priority comes from urgency words, else from the
//! category. The same text always gives the same answer.

use std::sync::LazyLock;

use serde_json::{Map, Value, json};

/// The prefix of every suggested reply, so nobody mistakes the answer for a model's.
pub const SIMULATOR_NOTE: &str = "[llm-sim] ";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Category {
    Outage,
    Billing,
    Login,
    Bug,
    FeatureRequest,
    Other,
}

impl Category {
    /// In tie-break order.
    pub const ALL: [Category; 5] = [
        Category::Outage,
        Category::Billing,
        Category::Login,
        Category::Bug,
        Category::FeatureRequest,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Category::Outage => "outage",
            Category::Billing => "billing",
            Category::Login => "login",
            Category::Bug => "bug",
            Category::FeatureRequest => "feature_request",
            Category::Other => "other",
        }
    }

    /// Other names a caller's taxonomy may use for the same category.
    fn synonyms(self) -> &'static [&'static str] {
        match self {
            Category::Outage => &["incident", "availability", "downtime"],
            Category::Billing => &["payment", "payments", "invoice", "invoicing"],
            Category::Login => &["account", "authentication", "access", "account_access"],
            Category::Bug => &["technical", "defect", "technical_issue", "error"],
            Category::FeatureRequest => &["feature", "enhancement", "suggestion"],
            Category::Other => &["general", "question"],
        }
    }

    fn keywords(self) -> &'static [&'static str] {
        match self {
            Category::Outage => &[
                "down",
                "outage*",
                "503",
                "502",
                "unavailable",
                "not loading",
                "doesn't load",
                "does not load",
                "won't load",
                "can't reach",
                "cannot reach",
                "unreachable",
                "offline",
                "timed out",
                "timeout*",
                "is down",
                "went down",
                // de
                "ausfall*",
                "ausgefallen",
                "nicht erreichbar",
                "störung*",
                "lädt nicht",
                // fr
                "panne*",
                "indisponible*",
                "hors service",
                "ne charge pas",
                "inaccessible*",
                // es
                "caído",
                "caída",
                "caido",
                "no carga",
                "fuera de servicio",
                "interrupci*",
                "inaccesible*",
            ],
            Category::Billing => &[
                "invoice*",
                "bill",
                "billing",
                "billed",
                "charged",
                "charge",
                "charges",
                "overcharg*",
                "refund*",
                "payment*",
                "paid",
                "pay",
                "subscription*",
                "credit card",
                "receipt*",
                "pricing",
                // de
                "rechnung*",
                "zahlung*",
                "abbuchung*",
                "abgebucht",
                "erstattung*",
                "rückerstattung*",
                "bezahlt",
                "kreditkarte",
                // fr
                "facture*",
                "facturé*",
                "paiement*",
                "rembours*",
                "prélèvement*",
                "débité*",
                "abonnement*",
                // es
                "factura*",
                "cobro*",
                "cobrado*",
                "cobraron",
                "reembolso*",
                "pago*",
                "suscripci*",
                "tarjeta de crédito",
            ],
            Category::Login => &[
                "password*",
                "login*",
                "log in",
                "sign in",
                "signin",
                "2fa",
                "two factor",
                "two-factor",
                "mfa",
                "locked out",
                "lockout",
                "can't log",
                "cannot log",
                "account locked",
                "authenticat*",
                "sso",
                // de
                "passwort*",
                "kennwort*",
                "anmeld*",
                "einloggen",
                "gesperrt",
                "zugang",
                // fr
                "mot de passe",
                "connexion",
                "connecter",
                "identifiant*",
                "verrouill*",
                // es
                "contraseña*",
                "iniciar sesión",
                "inicio de sesión",
                "bloquead*",
            ],
            Category::Bug => &[
                "error*",
                "crash*",
                "broken",
                "bug",
                "bugs",
                "exception*",
                "fails",
                "failed",
                "failing",
                "failure",
                "doesn't work",
                "does not work",
                "not working",
                "glitch*",
                "stack trace",
                // de
                "fehler*",
                "absturz",
                "stürzt",
                "abgestürzt",
                "kaputt",
                "funktioniert nicht",
                // fr
                "erreur*",
                "plantage",
                "plante",
                "bogue",
                "ne fonctionne pas",
                "cassé*",
                // es
                "errores",
                "fallo*",
                "falla*",
                "se cuelga",
                "roto",
                "no funciona",
            ],
            Category::FeatureRequest => &[
                "feature*",
                "would be nice",
                "would be great",
                "please add",
                "could you add",
                "can you add",
                "suggestion*",
                "enhancement*",
                "wish",
                "add support",
                // de
                "wäre schön",
                "wäre toll",
                "bitte hinzufügen",
                "vorschlag*",
                "wunsch",
                "funktion wünsch*",
                // fr
                "fonctionnalité*",
                "ce serait bien",
                "pourriez vous ajouter",
                "serait utile",
                // es
                "sería genial",
                "sería útil",
                "sugerencia*",
                "podrían añadir",
                "funcionalidad*",
            ],
            Category::Other => &[],
        }
    }

    fn default_priority(self) -> Priority {
        match self {
            Category::Outage => Priority::High,
            Category::FeatureRequest => Priority::Low,
            Category::Billing | Category::Login | Category::Bug | Category::Other => {
                Priority::Normal
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    Urgent,
    High,
    Normal,
    Low,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Urgent => "urgent",
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    fn synonyms(self) -> &'static [&'static str] {
        match self {
            Priority::Urgent => &["critical", "highest", "p0", "p1"],
            Priority::High => &["important", "p2"],
            Priority::Normal => &["medium", "moderate", "p3"],
            Priority::Low => &["lowest", "minor", "p4"],
        }
    }
}

/// Words that lower the priority; checked first, since "not urgent" contains "urgent".
const LOW_WORDS: &[&str] = &[
    "not urgent",
    "no rush",
    "when you have time",
    "low priority",
    "minor",
    "nicht dringend",
    "keine eile",
    "pas urgent",
    "no es urgente",
    "sin prisa",
];

const URGENT_WORDS: &[&str] = &[
    "urgent*",
    "asap",
    "immediately",
    "emergency",
    "critical",
    "production down",
    "prod down",
    "right now",
    "as soon as possible",
    "dringend*",
    "sofort",
    "notfall",
    "kritisch",
    "urgence",
    "immédiatement",
    "critique",
    "au plus vite",
    "urgente*",
    "inmediatamente",
    "emergencia",
    "crítico",
    "lo antes posible",
];

const HIGH_WORDS: &[&str] = &[
    "important",
    "blocked",
    "blocking",
    "cannot work",
    "can't work",
    "severe",
    "serious",
    "all users",
    "everyone",
    "wichtig",
    "blockiert",
    "alle nutzer",
    "bloqué*",
    "tous les utilisateurs",
    "importante",
    "todos los usuarios",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Language {
    English,
    German,
    French,
    Spanish,
}

const STOPWORDS: [(Language, &[&str]); 4] = [
    (
        Language::English,
        &[
            "the", "and", "is", "my", "i", "not", "you", "please", "it", "we",
        ],
    ),
    (
        Language::German,
        &[
            "der", "die", "das", "und", "ist", "nicht", "ich", "mein", "bitte", "wir",
        ],
    ),
    (
        Language::French,
        &[
            "le", "la", "les", "et", "est", "pas", "je", "mon", "vous", "nous",
        ],
    ),
    (
        Language::Spanish,
        &[
            "el", "los", "y", "es", "mi", "por", "gracias", "favor", "que", "no",
        ],
    ),
];

/// A triage decision.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Triage {
    pub category: Category,
    pub priority: Priority,
    /// 0.35 when nothing matched, else 0.6 plus 0.1 per extra hit, at most 0.9.
    pub confidence: f64,
    pub language: Language,
}

/// Keyword lists in matching form, built once.
struct Rules {
    categories: Vec<(Category, Vec<String>)>,
    low: Vec<String>,
    urgent: Vec<String>,
    high: Vec<String>,
    stopwords: Vec<(Language, Vec<String>)>,
}

static RULES: LazyLock<Rules> = LazyLock::new(|| {
    let needles = |words: &[&str]| words.iter().map(|word| needle(word)).collect::<Vec<_>>();
    Rules {
        categories: Category::ALL
            .iter()
            .map(|category| (*category, needles(category.keywords())))
            .collect(),
        low: needles(LOW_WORDS),
        urgent: needles(URGENT_WORDS),
        high: needles(HIGH_WORDS),
        stopwords: STOPWORDS
            .iter()
            .map(|(language, words)| (*language, needles(words)))
            .collect(),
    }
});

/// Lowercase, every non-alphanumeric character a space, single spaces, padded with spaces, so
/// that word boundaries are spaces.
fn normalize(text: &str) -> String {
    let mut normalized = String::with_capacity(text.len() + 2);
    normalized.push(' ');
    for ch in text.chars().flat_map(char::to_lowercase) {
        if ch.is_alphanumeric() {
            normalized.push(ch);
        } else if !normalized.ends_with(' ') {
            normalized.push(' ');
        }
    }
    if !normalized.ends_with(' ') {
        normalized.push(' ');
    }
    normalized
}

/// A keyword as a substring of normalized text: `word` matches the whole word, `pre*` any word
/// starting with `pre`, and phrases match word by word.
fn needle(keyword: &str) -> String {
    match keyword.strip_suffix('*') {
        Some(prefix) => normalize(prefix).trim_end().to_owned(),
        None => normalize(keyword),
    }
}

fn count_hits(text: &str, needles: &[String]) -> usize {
    needles
        .iter()
        .filter(|needle| text.contains(needle.as_str()))
        .count()
}

/// Triages `ticket` by the keyword rules.
pub fn classify(ticket: &str) -> Triage {
    let rules = &*RULES;
    let text = normalize(ticket);
    let mut best: Option<(Category, usize)> = None;
    for (category, needles) in &rules.categories {
        let hits = count_hits(&text, needles);
        if hits > 0 && best.is_none_or(|(_, best_hits)| hits > best_hits) {
            best = Some((*category, hits));
        }
    }
    let (category, hits) = best.unwrap_or((Category::Other, 0));
    let priority = if count_hits(&text, &rules.low) > 0 {
        Priority::Low
    } else if count_hits(&text, &rules.urgent) > 0 {
        Priority::Urgent
    } else if count_hits(&text, &rules.high) > 0 {
        Priority::High
    } else {
        category.default_priority()
    };
    let confidence = match hits {
        0 => 0.35,
        hits => 0.6 + 0.1 * (hits.min(4) - 1) as f64,
    };
    let language = rules
        .stopwords
        .iter()
        .map(|(language, needles)| (*language, count_hits(&text, needles)))
        .fold((Language::English, 0), |best, candidate| {
            if candidate.1 > best.1 {
                candidate
            } else {
                best
            }
        })
        .0;
    Triage {
        category,
        priority,
        confidence: (confidence * 100.0).round() / 100.0,
        language,
    }
}

/// The text between `<ticket>` and `</ticket>` when present, else the whole message.
pub fn ticket_text(message: &str) -> &str {
    let Some(start) = message.find("<ticket>") else {
        return message;
    };
    let body = &message[start + "<ticket>".len()..];
    match body.find("</ticket>") {
        Some(end) => &body[..end],
        None => body,
    }
}

/// A short reply to the customer, in the ticket's language, marked as the simulator's.
pub fn suggested_reply(triage: &Triage) -> String {
    use Category::*;
    use Language::*;
    let body = match (triage.language, triage.category) {
        (English, Outage) => {
            "We are sorry for the disruption. Our team is investigating the outage and will update you as soon as the service is restored."
        }
        (English, Billing) => {
            "Thank you for reaching out about your bill. We are reviewing the charge and will correct it or issue a refund if it was wrong."
        }
        (English, Login) => {
            "Sorry you cannot sign in. Please try resetting your password; if that fails, we will unlock your account for you."
        }
        (English, Bug) => {
            "Thank you for reporting this problem. We have reproduced the steps you describe and passed them to our engineers."
        }
        (English, FeatureRequest) => {
            "Thank you for the suggestion. We have added it to our product backlog for review."
        }
        (English, Other) => {
            "Thank you for contacting us. A member of our support team will get back to you shortly."
        }
        (German, Outage) => {
            "Entschuldigen Sie die Störung. Unser Team untersucht den Ausfall und meldet sich, sobald der Dienst wieder läuft."
        }
        (German, Billing) => {
            "Danke für Ihre Nachricht zur Rechnung. Wir prüfen die Abbuchung und korrigieren oder erstatten sie, falls sie falsch war."
        }
        (German, Login) => {
            "Schade, dass die Anmeldung nicht klappt. Bitte setzen Sie Ihr Passwort zurück; sonst entsperren wir Ihr Konto."
        }
        (German, Bug) => {
            "Danke für die Fehlermeldung. Wir haben die Schritte an unser Entwicklungsteam weitergegeben."
        }
        (German, FeatureRequest) => {
            "Danke für den Vorschlag. Wir haben ihn zur Prüfung in unsere Planung aufgenommen."
        }
        (German, Other) => {
            "Danke für Ihre Nachricht. Unser Support meldet sich in Kürze bei Ihnen."
        }
        (French, Outage) => {
            "Nous sommes désolés pour cette interruption. Notre équipe analyse la panne et vous tiendra informé dès le rétablissement du service."
        }
        (French, Billing) => {
            "Merci pour votre message concernant votre facture. Nous vérifions le prélèvement et le corrigerons ou le rembourserons si nécessaire."
        }
        (French, Login) => {
            "Désolé que vous ne puissiez pas vous connecter. Essayez de réinitialiser votre mot de passe ; sinon nous déverrouillerons votre compte."
        }
        (French, Bug) => {
            "Merci d'avoir signalé ce problème. Nous avons transmis les étapes à nos ingénieurs."
        }
        (French, FeatureRequest) => {
            "Merci pour cette suggestion. Nous l'avons ajoutée à notre feuille de route pour étude."
        }
        (French, Other) => {
            "Merci de nous avoir contactés. Notre équipe support vous répondra rapidement."
        }
        (Spanish, Outage) => {
            "Lamentamos la interrupción. Nuestro equipo está investigando la caída y le avisaremos en cuanto el servicio se restablezca."
        }
        (Spanish, Billing) => {
            "Gracias por escribirnos sobre su factura. Revisaremos el cobro y lo corregiremos o reembolsaremos si fue un error."
        }
        (Spanish, Login) => {
            "Lamentamos que no pueda iniciar sesión. Restablezca su contraseña; si no funciona, desbloquearemos su cuenta."
        }
        (Spanish, Bug) => {
            "Gracias por informar del problema. Hemos enviado los pasos a nuestros ingenieros."
        }
        (Spanish, FeatureRequest) => {
            "Gracias por la sugerencia. La hemos añadido a nuestra lista de mejoras para revisarla."
        }
        (Spanish, Other) => {
            "Gracias por contactarnos. Nuestro equipo de soporte le responderá en breve."
        }
    };
    format!("{SIMULATOR_NOTE}{body}")
}

/// The triage answer as a JSON object, shaped by the request's JSON schema when there is one:
/// `enum`s for `category` and `priority` are honoured, only properties the schema lists are
/// kept (when it lists any), and required properties the rules do not produce get a neutral
/// value of their declared type.
pub fn answer_json(triage: &Triage, schema_opt: Option<&Value>) -> Value {
    let mut answer = Map::new();
    answer.insert("category".into(), json!(triage.category.as_str()));
    answer.insert("priority".into(), json!(triage.priority.as_str()));
    answer.insert("suggested_reply".into(), json!(suggested_reply(triage)));
    answer.insert("confidence".into(), json!(triage.confidence));
    let Some(schema) = schema_opt else {
        return Value::Object(answer);
    };
    let properties_opt = schema.get("properties").and_then(Value::as_object);
    if let Some(choices) = enum_of(properties_opt, "category") {
        let picked = pick(
            choices,
            triage.category.as_str(),
            triage.category.synonyms(),
            Some(Category::Other.as_str()),
        );
        answer.insert("category".into(), picked);
    }
    if let Some(choices) = enum_of(properties_opt, "priority") {
        let picked = pick(
            choices,
            triage.priority.as_str(),
            triage.priority.synonyms(),
            None,
        );
        answer.insert("priority".into(), picked);
    }
    let Some(properties) = properties_opt else {
        return Value::Object(answer);
    };
    answer.retain(|name, _| properties.contains_key(name));
    let required = schema
        .get("required")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for name in required.iter().filter_map(Value::as_str) {
        if !answer.contains_key(name) {
            let neutral = neutral_value(properties.get(name));
            answer.insert(name.to_owned(), neutral);
        }
    }
    Value::Object(answer)
}

fn enum_of<'a>(properties_opt: Option<&'a Map<String, Value>>, name: &str) -> Option<&'a [Value]> {
    properties_opt?
        .get(name)?
        .get("enum")?
        .as_array()
        .map(Vec::as_slice)
        .filter(|choices| !choices.is_empty())
}

/// The enum value matching `value` (or one of its synonyms), else `fallback`, else the first.
fn pick(choices: &[Value], value: &str, synonyms: &[&str], fallback: Option<&str>) -> Value {
    let key = |text: &str| text.to_lowercase().replace(['-', ' '], "_");
    let find = |wanted: &str| {
        choices
            .iter()
            .find(|choice| {
                choice
                    .as_str()
                    .is_some_and(|choice| key(choice) == key(wanted))
            })
            .cloned()
    };
    std::iter::once(value)
        .chain(synonyms.iter().copied())
        .chain(fallback)
        .find_map(find)
        .unwrap_or_else(|| choices[0].clone())
}

fn neutral_value(property_opt: Option<&Value>) -> Value {
    if let Some(first) = property_opt
        .and_then(|property| property.get("enum"))
        .and_then(Value::as_array)
        .and_then(|choices| choices.first())
    {
        return first.clone();
    }
    let declared = property_opt
        .and_then(|property| property.get("type"))
        .and_then(|declared| match declared {
            Value::Array(types) => types.first().and_then(Value::as_str),
            other => other.as_str(),
        })
        .unwrap_or("string");
    match declared {
        "number" | "integer" => json!(0),
        "boolean" => json!(false),
        "array" => json!([]),
        "object" => json!({}),
        "null" => Value::Null,
        _ => json!(SIMULATOR_NOTE.trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_pick_categories_in_several_languages() {
        let cases = [
            (
                "I was charged twice on my last invoice, please refund",
                Category::Billing,
            ),
            (
                "The dashboard is down, we get 503 on every page",
                Category::Outage,
            ),
            ("I forgot my password and 2FA locks me out", Category::Login),
            (
                "The export button throws an error and the app crashes",
                Category::Bug,
            ),
            (
                "It would be nice to have a dark mode, please add it",
                Category::FeatureRequest,
            ),
            ("What are your opening hours?", Category::Other),
            (
                "Meine Rechnung ist falsch, bitte Rückerstattung",
                Category::Billing,
            ),
            ("Le site est en panne depuis ce matin", Category::Outage),
            (
                "No puedo iniciar sesión, olvidé mi contraseña",
                Category::Login,
            ),
            ("Die App stürzt ab, Fehler beim Speichern", Category::Bug),
            ("I downloaded the markdown file", Category::Other),
        ];
        for (ticket, expected) in cases {
            assert_eq!(classify(ticket).category, expected, "{ticket}");
        }
    }

    #[test]
    fn priority_follows_urgency_words_then_category() {
        assert_eq!(
            classify("Production down, fix ASAP").priority,
            Priority::Urgent
        );
        assert_eq!(classify("The site is down").priority, Priority::High);
        assert_eq!(
            classify("Not urgent, but the site was down").priority,
            Priority::Low
        );
        assert_eq!(classify("Please add a feature").priority, Priority::Low);
        assert_eq!(classify("Wrong invoice").priority, Priority::Normal);
        assert_eq!(
            classify("Dringend: Rechnung doppelt").priority,
            Priority::Urgent
        );
    }

    #[test]
    fn replies_are_marked_and_in_the_tickets_language() {
        let german = classify("Ich kann mich nicht anmelden, mein Passwort ist gesperrt");
        assert_eq!(german.language, Language::German);
        let reply = suggested_reply(&german);
        assert!(reply.starts_with("[llm-sim] "), "{reply}");
        assert!(reply.contains("Passwort"), "{reply}");
    }

    #[test]
    fn ticket_delimiters_are_honoured() {
        assert_eq!(
            ticket_text("Triage this:\n<ticket>refund please</ticket>\nJSON only"),
            "refund please"
        );
        assert_eq!(ticket_text("no delimiters"), "no delimiters");
    }

    #[test]
    fn schema_enums_and_properties_shape_the_answer() {
        let triage = classify("Please add an export feature");
        let schema = json!({
            "type": "object",
            "properties": {
                "category": {"type": "string", "enum": ["Billing", "Enhancement", "Other"]},
                "priority": {"type": "string", "enum": ["P1", "medium", "minor"]},
                "suggested_reply": {"type": "string"},
                "tags": {"type": "array", "items": {"type": "string"}}
            },
            "required": ["category", "priority", "suggested_reply", "tags"],
            "additionalProperties": false
        });
        let answer = answer_json(&triage, Some(&schema));
        assert_eq!(answer["category"], "Enhancement");
        assert_eq!(answer["priority"], "minor");
        assert_eq!(answer["tags"], json!([]));
        assert!(answer.get("confidence").is_none());
        let unknown = answer_json(
            &classify("hello"),
            Some(&json!({
                "properties": {"category": {"enum": ["a", "b"]}}
            })),
        );
        assert_eq!(unknown["category"], "a");
    }
}
