"""``hallo3 eval``: lip-sync (SyncNet Sync-C / Sync-D / AV offset) and identity (ArcFace) scores.

    from hallo3_cli.evaluate import evaluate_video
    report = evaluate_video("out.mp4", ref="face.png")
    print(report.sync.confidence, report.identity.mean)
"""

from hallo3_cli.evaluate.run import (EVAL_WEIGHTS, EvalReport, eval_path, evaluate_render, evaluate_video, format_table,
                                     require_eval_weights)

__all__ = ["EVAL_WEIGHTS", "EvalReport", "eval_path", "evaluate_render", "evaluate_video", "format_table",
           "require_eval_weights"]
