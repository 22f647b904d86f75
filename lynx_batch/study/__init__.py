"""Identity studies: many faces x prompts x settings over many ComfyUI servers, scored and reported."""
