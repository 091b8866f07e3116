"""The tiny random demo models of every family (small dimensions, real processors, built offline): what
`dymu demo`, `dymu env --check` and the family contract suite build (`dymu.tools.demo_models` lists them)."""
