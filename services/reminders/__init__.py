"""Friendly reminders to merchants whose online orders need attention.

`planning` decides who is due and about what (pure, clock passed in); `message` renders the
e-mail from Jinja2 templates; `smtp` sends it; `service` ties them together with the outbox
(intent before effect), the audit trail, recovery, history and opt-out.
"""

from services.reminders.message import MessageBuilder, RenderedReminder
from services.reminders.planning import ReminderKind, ReminderPlan, ReminderPolicy, SkipCode
from services.reminders.service import ReminderProgress, ReminderResult, ReminderService
from services.reminders.smtp import SmtpAnswer, SmtpSession, SmtpTarget, SmtpUnavailable

__all__ = ["MessageBuilder", "ReminderKind", "ReminderPlan", "ReminderPolicy",
           "ReminderProgress", "ReminderResult", "ReminderService", "RenderedReminder",
           "SkipCode", "SmtpAnswer", "SmtpSession", "SmtpTarget", "SmtpUnavailable"]
