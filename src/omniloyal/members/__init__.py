"""Members, their cards and identifiers, questionnaire, custom attributes and consents."""
