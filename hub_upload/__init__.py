"""Export a trained run folder as a Hub repository (remote code, model card) and push it.

- `hub_upload.run_folder`: `check_run_folder(run_dir)` — is it a trained run? (names what is missing)
- `hub_upload.export`: `export_run(run_dir, out_dir, ...)`, `export_adapter(run_dir, out_dir)`
- `hub_upload.model_card`: `build_model_card(report, ...)` — numbers from report.json only
- `hub_upload.push`: `push_folder(folder, repo_id, ...)` — one commit, token never printed
- `hub_upload/space/`: the Gradio Space (app.py, requirements.txt, README.md)

Nothing is imported here: `push` must stay light (no torch) for the command line.
"""
