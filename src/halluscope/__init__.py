"""halluscope: find why vision-language models hallucinate, and fix it."""
