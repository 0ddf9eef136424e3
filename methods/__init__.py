"""Method plugins: one import per plugin, sorted. Importing registers them."""

from methods import byol as byol
from methods import random as random
from methods import simclr as simclr
from methods import supervised as supervised
